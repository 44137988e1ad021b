"""The stages a message's encoding is made of; importing this package registers every one.

    from kvlink.stages import Select, Sink, Rotate, LowRank, Predict, Quantize, Zstd, stage_class

kvlink.stages.base has the interface; kvlink.recipe composes stages into a
message's recipe and names it; kvlink.codec runs a recipe. docs/stages.md says
how to add one.
"""

from kvlink.stages.ans import Ans
from kvlink.stages.base import Item, Stage, Transform, register, registered_stages, stage_class
from kvlink.stages.clamp import Clamp
from kvlink.stages.lowrank import LowRank
from kvlink.stages.pca import Pca
from kvlink.stages.predict import Predict
from kvlink.stages.quantize import Quantize
from kvlink.stages.rotate import Rotate
from kvlink.stages.select import Select
from kvlink.stages.sink import Sink
from kvlink.stages.zstd import Zstd

__all__ = [
    "Ans",
    "Clamp",
    "Item",
    "LowRank",
    "Pca",
    "Predict",
    "Quantize",
    "Rotate",
    "Select",
    "Sink",
    "Stage",
    "Transform",
    "Zstd",
    "register",
    "registered_stages",
    "stage_class",
]
