import pyarrow as pa
import pytest

from corpus_anon import secret as sec
from corpus_anon.config import ConfigError, config_from_dict
from corpus_anon.run.pipeline import assign_identities

SECRET = "s" * 40


def test_secret_rules(monkeypatch):
    monkeypatch.delenv(sec.SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match="needs the secret"):
        sec.read_secret("diffslva")
    monkeypatch.setenv(sec.SECRET_ENV, "short")
    with pytest.raises(ConfigError, match="at least 32"):
        sec.read_secret("diffslva")
    monkeypatch.setenv(sec.SECRET_ENV, SECRET)
    raw = sec.read_secret("diffslva")
    assert sec.key_id(raw) == sec.key_id(SECRET.encode()) and SECRET not in sec.key_id(raw)
    assert sec.key_id(raw) != sec.key_id(b"t" * 40)
    monkeypatch.setenv(sec.SECRET_ENV, SECRET + "\n")  # a Secret made --from-file keeps the newline
    assert sec.read_secret("diffslva") == raw


def test_seeds_per_signer_and_domain_separation():
    a, b = SECRET.encode(), ("x" * 40).encode()
    assert sec.derive_seed(a, "cory") == sec.derive_seed(a, "cory")
    assert sec.derive_seed(a, "cory") != sec.derive_seed(a, "lana")
    assert sec.derive_seed(a, "cory") != sec.derive_seed(b, "cory")
    assert 0 <= sec.derive_seed(a, "cory") < 2**31
    assert sec.reseed(5, 1) != sec.reseed(5, 2) and sec.reseed(5, 1) == sec.reseed(5, 1)
    assert sec.pick_prompt(["a", "b"], 3) == "b"


def test_driver_assigns_seed_and_prompt(monkeypatch):
    cfg = config_from_dict({"anonymizer": {"kind": "diffslva"}, "diffusion": {"prompt_bank": ["p0", "p1", "p2"]}})
    t = pa.table({"clip_id": ["a", "b", "c"], "video_uri": ["/x"] * 3, "signer_id": ["s1", "s1", "s2"],
                  "seed": pa.array([None, None, 7], pa.int64()), "prompt": [None, "given", None]})
    monkeypatch.delenv(sec.SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match="needs the secret"):
        assign_identities(t, cfg)
    monkeypatch.setenv(sec.SECRET_ENV, SECRET)
    out, kid = assign_identities(t, cfg)
    rows = out.to_pylist()
    assert rows[0]["seed"] == rows[1]["seed"] == sec.derive_seed(SECRET.encode(), "s1")
    assert rows[2]["seed"] == 7 and rows[1]["prompt"] == "given"
    assert rows[0]["prompt"] == ["p0", "p1", "p2"][rows[0]["seed"] % 3] and rows[2]["prompt"] == "p1"
    assert kid == sec.key_id(SECRET.encode())
    # Every row seeded in the manifest: no secret needed, no key id.
    monkeypatch.delenv(sec.SECRET_ENV)
    seeded = t.set_column(3, "seed", pa.array([1, 2, 3], pa.int64()))
    out2, kid2 = assign_identities(seeded, cfg)
    assert kid2 is None and out2.column("seed").to_pylist() == [1, 2, 3]
