import pyarrow as pa
import pytest

from corpus_anon.config import config_from_dict
from corpus_anon.pipeline import RunError, _resolve_gpus, metrics_table


class FakeRay:
    def __init__(self, gpus):
        self.gpus = gpus

    def cluster_resources(self):
        return {"CPU": 2.0, **({"GPU": self.gpus} if self.gpus else {})}


def test_cuda_without_gpus_fails_in_one_sentence():
    with pytest.raises(RunError, match="no GPU resources"):
        _resolve_gpus(config_from_dict({"device": "cuda"}), FakeRay(0))


@pytest.mark.parametrize("cfg,gpus,expected", [
    ({"device": "auto"}, 0, (False, 0.0)),
    ({"device": "cpu"}, 4, (False, 0.0)),
    ({"device": "cuda"}, 2, (True, 1.0)),
    ({"device": "cuda", "resources": {"gpus_per_actor": 0.5}}, 1, (True, 0.5)),
    ({"device": "auto"}, 2, (False, 0.0)),  # pixelate holds no GPU unless cuda is asked for
])
def test_gpu_resolution(cfg, gpus, expected):
    assert _resolve_gpus(config_from_dict(cfg), FakeRay(gpus)) == expected


def test_more_gpus_per_actor_than_the_cluster_has():
    with pytest.raises(RunError, match="gpus_per_actor"):
        _resolve_gpus(config_from_dict({"device": "cuda", "resources": {"gpus_per_actor": 2}}), FakeRay(1))


def test_metrics_table_one_row_per_manifest_row_with_passthrough():
    manifest = pa.table({"clip_id": ["a", "b"], "video_uri": ["/x/a", "/x/b"], "signer_id": ["s", "t"],
                         "gloss": ["HELLO", None], "session": [1, 2]})
    records = {
        "b": {"clip_id": "b", "status": "error", "error": "bad.", "attempts": 1, "metrics": {}},
        "a": {"clip_id": "a", "status": "ok", "attempts": 1, "output_uri": "s3://o/a.mp4",
              "metrics": {"n_frames": 10, "fps": 30.0, "faces_found": 1}},
    }
    t = metrics_table(manifest, records).to_pylist()
    assert [r["clip_id"] for r in t] == ["a", "b"]
    assert t[0]["n_frames"] == 10 and t[0]["faces_found"] == 1 and t[1]["n_frames"] is None
    assert t[0]["gloss"] == "HELLO" and t[1]["session"] == 2 and t[1]["error"] == "bad."
    for col in ("t_fetch_s", "t_anonymize_s", "t_publish_s", "sha256", "width", "height", "duration_s"):
        assert col in t[0]
