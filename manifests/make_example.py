"""Regenerate manifests/example.parquet (the schema example the README points at).

    .venv/bin/python manifests/make_example.py
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))

SCHEMA = pa.schema([
    ("clip_id", pa.string()),
    ("video_uri", pa.string()),
    ("signer_id", pa.string()),
    ("start_s", pa.float64()),
    ("end_s", pa.float64()),
    ("prompt", pa.string()),
    ("seed", pa.int64()),
    ("face_boxes_uri", pa.string()),
    ("gloss", pa.string()),  # any other column passes through to the metrics
])

ROWS = [
    {"clip_id": "sess115_utt022", "video_uri": "s3://my-corpus/raw/sess115.mov", "signer_id": "signer07",
     "start_s": 12.40, "end_s": 15.93, "prompt": None, "seed": None, "face_boxes_uri": None, "gloss": "IX-1 BOOK"},
    {"clip_id": "sess115_utt053", "video_uri": "s3://my-corpus/raw/sess115.mov", "signer_id": "signer07",
     "start_s": 81.00, "end_s": 84.47, "prompt": "a man in CG style, blonde hair, is making gestures",
     "seed": 1234, "face_boxes_uri": None, "gloss": "WHERE"},
    {"clip_id": "s3_story_001", "video_uri": "s3://my-corpus/raw/story_001.mp4", "signer_id": "signer03",
     "start_s": None, "end_s": None, "prompt": None, "seed": None,
     "face_boxes_uri": "s3://my-corpus/boxes/story_001.json", "gloss": None},
]

if __name__ == "__main__":
    pq.write_table(pa.Table.from_pylist(ROWS, schema=SCHEMA), os.path.join(HERE, "example.parquet"))
    print("wrote", os.path.join(HERE, "example.parquet"))
