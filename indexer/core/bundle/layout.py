"""The names of everything in a bundles dir (docs/architecture.md, "Bundle format")."""

SCHEMA_VERSION = 1
CURRENT = "CURRENT"  # one line: the active bundle's name; replaced atomically
MANIFEST = "manifest.json"
IMAGES_INDEX = "images.faiss"
TEXTS_INDEX = "texts.faiss"
ITEMS_DB = "items.sqlite"
SKIPPED = "skipped.jsonl"
MODEL_DIR = "model"
SEGMENTS_DIR = "segments"  # delta segments: segments/<name>/ holds IMAGES_INDEX, TEXTS_INDEX, ITEMS_DB
WORK_DIR = ".work"  # the indexer's private state: caches, file signatures, the lock
LEASES_DIR = ".leases"  # servers' records of the bundles they serve, so gc keeps them
TMP_PREFIX = ".tmp-"  # a bundle being written; removed by the next run if it was left behind
