"""The baseline for benchmarks/serve.py: the FastAPI app a user would write without batching.

The model loads once at import; each request encodes on its own (full 77-token text forward) and
runs its own FAISS search, in FastAPI's threadpool. Same bundle, same JSON shape as clipsearch.
Run: CLIPSEARCH_BENCH_BUNDLE=BUNDLE_DIR uvicorn naive_serve_app:app --app-dir benchmarks
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import faiss
import numpy as np
import open_clip
import torch
from fastapi import FastAPI, File, Form, UploadFile
from PIL import Image
from pydantic import BaseModel

BUNDLE = Path(os.environ["CLIPSEARCH_BENCH_BUNDLE"])
# The benchmark gives both apps the same torch thread count (the one knob a user might set).
if "CLIPSEARCH_BENCH_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["CLIPSEARCH_BENCH_THREADS"]))
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{BUNDLE / 'model'}")
model.eval()
tokenizer = open_clip.get_tokenizer(f"local-dir:{BUNDLE / 'model'}")
indexes = {
    "images": faiss.read_index(str(BUNDLE / "images.faiss")),
    "texts": faiss.read_index(str(BUNDLE / "texts.faiss")),
}
db = sqlite3.connect(BUNDLE / "items.sqlite", check_same_thread=False)
db_lock = threading.Lock()

app = FastAPI()


class Query(BaseModel):
    query: str
    k: int = 10
    target: str = "images"


def results(emb: np.ndarray, k: int, target: str) -> dict[str, object]:
    scores, ids = indexes[target].search(emb, k)
    out = []
    with db_lock:
        for score, item_id in zip(scores[0], ids[0], strict=True):
            row = db.execute(
                "SELECT id, kind, path, text FROM items WHERE id = ?", (int(item_id),)
            ).fetchone()
            out.append({"id": row[0], "score": float(score), "kind": row[1], "path": row[2], "text": row[3]})
    return {"results": out}


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/search/text")
def search_text(q: Query) -> dict[str, object]:
    with torch.no_grad():
        emb = model.encode_text(tokenizer([q.query]), normalize=True).numpy()
    return results(emb, q.k, q.target)


@app.post("/v1/search/image")
def search_image(
    file: UploadFile = File(...), k: int = Form(10), target: str = Form("images")
) -> dict[str, object]:
    image = Image.open(file.file).convert("RGB")
    with torch.no_grad():
        emb = model.encode_image(preprocess(image).unsqueeze(0), normalize=True).numpy()
    return results(emb, k, target)
