"""Dataset readers (official folder layouts) and built-in data from pip packages."""

from pyfici.data.builtin import builtin_images
from pyfici.data.retrieval import (
    RECALL_KS,
    RETRIEVAL_DATASETS,
    BuiltinRetrieval,
    RetrievalImageDataset,
    RetrievalSplit,
    aircraft,
    builtin_retrieval,
    cars196,
    cub200,
    inshop,
    load_retrieval_dataset,
    sop,
)

__all__ = [
    "BuiltinRetrieval", "builtin_images", "builtin_retrieval", "RECALL_KS", "RETRIEVAL_DATASETS",
    "RetrievalImageDataset", "RetrievalSplit", "aircraft", "cars196", "cub200", "inshop",
    "load_retrieval_dataset", "sop",
]

from pyfici.data.reid import (  # noqa: E402
    REID_DATASETS,
    PKSampler,
    ReIDDataset,
    ReIDImageDataset,
    builtin_reid,
    cuhk03_np,
    dukemtmc,
    load_reid_dataset,
    market1501,
    msmt17,
)

__all__ += [
    "PKSampler", "REID_DATASETS", "ReIDDataset", "ReIDImageDataset", "builtin_reid", "cuhk03_np",
    "dukemtmc", "load_reid_dataset", "market1501", "msmt17",
]
