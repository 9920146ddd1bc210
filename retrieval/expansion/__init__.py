"""Query expansion: move a text query towards the image side of CLIP's space before searching.

A text query vector t sits in the text region of the space; the images it describes sit in the
image region (the modality gap). An expander turns t into image-side vectors s₁…s_K, and the
query becomes either

  interp:  q = normalise((1 − A)·t + A·normalise(mean(sᵢ)))           (one search), or
  rrf:     the K+1 result lists of t and each sᵢ, merged by weighted reciprocal rank fusion
           (t's list weighs 1 − A, the sᵢ lists share A).

Expanders, all fitted on the library's own caption–image pairs (captions linked to images):
  meanshift    t + (mean image vector − mean text vector)        closed form
  ridge        a ridge regression text → image vector             closed form, numpy
  contrastive  a linear map text → image trained to rank each     contrastive.py,
               caption's own image first (InfoNCE)                `clipdex prior train`
  prior        K samples of a diffusion prior p(image | text)     prior.py, `clipdex prior train`
  pixels       K images generated from the text with a diffusers  pixels.py, extra `diffusion`
               pipeline, embedded with the library's image encoder

`clipdex prior train` saves the prior, the contrastive map and both baselines in the library
folder (prior.safetensors + prior.json); meanshift and ridge are fitted in memory when nothing is
saved. The default is the contrastive map: in bench/expansion.py it is the one expander that
moves R@1 beyond noise (the diffusion prior does not beat the closed-form baselines there).

Modules: options (the `Expansion` value and the tuned defaults), fusion (interpolation, RRF),
maps (the pairs and the maps), contrastive and prior (training, torch), pixels (diffusers),
saved (training and the files beside the library), expanders (what a Searcher runs).
"""

from index.errors import GeneratorUnavailable, MissingExtra, NoTrainingPairs, PriorNotTrained

from .expanders import Expanders
from .fusion import interpolate, reciprocal_rank_fusion
from .maps import ContrastiveMap, MeanShift, Pairs, RidgeMap, training_pairs
from .options import DEFAULT_METHOD, METHODS, Expansion, QueryExpander
from .saved import SavedExpanders, TrainReport, load_expanders, train_expanders

__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "ContrastiveMap",
    "Expanders",
    "Expansion",
    "GeneratorUnavailable",
    "MeanShift",
    "MissingExtra",
    "NoTrainingPairs",
    "Pairs",
    "PriorNotTrained",
    "QueryExpander",
    "RidgeMap",
    "SavedExpanders",
    "TrainReport",
    "interpolate",
    "load_expanders",
    "reciprocal_rank_fusion",
    "train_expanders",
    "training_pairs",
]
