import pyarrow as pa
import pytest

from corpus_anon.config import config_from_dict
from corpus_anon.run.pipeline import RunError, _resolve_gpus, metrics_table


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


class ScalingRay(FakeRay):
    """A cluster whose GPU workers join a while after the autoscaler is asked for them."""

    def __init__(self, join_after_polls):
        super().__init__(0)
        self.polls = 0
        self.join_after = join_after_polls

    def cluster_resources(self):
        self.polls += 1
        if self.join_after is not None and self.polls > self.join_after:
            self.gpus = 2
        return super().cluster_resources()


def test_cuda_on_an_autoscaling_cluster_asks_for_gpus_and_waits():
    asked = []
    cfg = config_from_dict({"device": "cuda", "resources": {"actors": 2, "gpu_wait_s": 60}})
    ray = ScalingRay(join_after_polls=3)
    assert _resolve_gpus(cfg, ray, request=lambda **kw: asked.append(kw), sleep=lambda s: None) == (True, 1.0)
    assert asked == [{"bundles": [{"GPU": 1.0}, {"GPU": 1.0}]}]
    from corpus_anon.run.pipeline import release_gpu_request

    release_gpu_request(ray, cfg, request=lambda **kw: asked.append(kw))
    assert asked[-1] == {"bundles": []}  # the standing request is withdrawn after the run


def test_cuda_gives_up_when_no_gpu_joins_in_time():
    import itertools

    cfg = config_from_dict({"device": "cuda", "resources": {"gpu_wait_s": 10}})
    t = itertools.count(0, 5)  # a fake clock: every look at it is 5 s later
    from corpus_anon.run import pipeline

    ray = ScalingRay(join_after_polls=None)
    with pytest.raises(RunError, match="no GPU joined the Ray cluster within resources.gpu_wait_s"):
        pipeline._resolve_gpus(cfg, ray, request=lambda **kw: None, sleep=lambda s: None, clock=lambda: next(t))
    assert ray.polls <= 4
