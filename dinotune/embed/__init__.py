"""One embedding per image (``dinotune embed``) and the DINO k-NN protocol on them (``dinotune knn``).

``features`` finds the images of a folder (split folders, class folders, plain folders) and runs a
backbone over them; ``store`` keeps the embeddings in a parquet file that a second call completes;
``knn`` is the weighted k-nearest-neighbour classifier of the DINO papers. Generic: no task is named.
"""

from dinotune.embed.features import POOLS, Item, embed_images, find_items
from dinotune.embed.knn import knn_classify, knn_scores
from dinotune.embed.store import read_embeddings, write_embeddings

__all__ = ["POOLS", "Item", "embed_images", "find_items", "knn_classify", "knn_scores", "read_embeddings",
           "write_embeddings"]
