"""report.html on a run folder built by hand (no Ray): self-contained, ranked, escaped, small."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from corpus_anon.io.records import RunLayout
from corpus_anon.run.report import UNENHANCED_COLUMN, write_report
from corpus_anon.io.storage import Storage, StorageSettings
from tests.media import face_frames, make_video

CFG_FP = "abc123def456"
EVIL_ERROR = "the input <script>alert('x')</script> & \"friends\" is not a readable video."
EVIL_CLIP = "s3_<b>odd</b>&id"


class Page(HTMLParser):
    """Every tag with its attributes, the text of each table, and the contact-sheet cards in order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.tables: list[list[list[str]]] = []
        self.cards: list[str] = []
        self._cell: list[str] | None = None
        self._in_h4 = False
        self._h4: list[str] = []

    def _close_cell(self) -> None:
        if self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
        self._cell = None

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        self.tags.append((tag, a))
        if tag in ("td", "th", "tr"):  # </td> and </tr> are optional in HTML
            self._close_cell()
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "h4":
            self._in_h4, self._h4 = True, []

    def handle_endtag(self, tag):
        if tag in ("td", "th", "tr", "tbody", "table"):
            self._close_cell()
        elif tag == "h4":
            self._in_h4 = False
            self.cards.append("".join(self._h4).strip())

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._in_h4:
            self._h4.append(data)

    def table_with(self, header: str) -> list[list[str]]:
        return next(t for t in self.tables if t and header in t[0])


def parse(text: str) -> Page:
    p = Page()
    p.feed(text)
    p.close()
    return p


def _decode_image(src: str) -> tuple[int, int]:
    from PIL import Image

    assert src.startswith("data:image/jpeg;base64,"), src[:40]
    im = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
    im.load()
    return im.size


def assert_self_contained(page: Page, text: str) -> None:
    for tag, attrs in page.tags:
        for k in ("src", "href", "srcset", "poster", "data", "action"):
            v = attrs.get(k, "").strip().lower()
            assert not v.startswith(("http:", "https:", "//", "file:", "ftp:")), (tag, k, v)
        assert tag not in ("link", "iframe", "object", "embed", "video", "audio", "source", "base"), tag
        if tag == "script":
            assert "src" not in attrs
        if tag == "img":
            assert attrs["src"].startswith("data:")
    assert "url(" not in text and "@import" not in text


def make_run(tmp_path, *, backend: str = "dlib", n_extra: int = 0, unenhanced: bool = False,
             exposure: dict[str, int] | None = None):
    """A finished run folder: 2 source videos, 3 'anonymized' clips, metrics with ok/leak/error rows."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    src1 = make_video(str(corpus / "session1.mp4"), n_frames=60, fps=20, frames=face_frames(60))
    src2 = make_video(str(corpus / "signer2.mp4"), n_frames=30, fps=20, frames=face_frames(30))
    out = tmp_path / "out"
    root = out / CFG_FP
    (root / "clips").mkdir(parents=True, exist_ok=True)
    (root / "metrics").mkdir(exist_ok=True)
    (out / "LATEST_RUN").write_text(CFG_FP)
    (root / "config.yaml").write_text(f"faces:\n  backend: {backend}\n")
    (root / "plan.json").write_text(json.dumps({"planned_clips": 6}))
    clips = {}
    for name in ("s1_a", "s1_b", "s2_a"):
        clips[name] = make_video(str(root / "clips" / f"{name}-0123456789ab.mp4"), n_frames=20, fps=20)
    unenh = make_video(str(root / "clips" / "s1_b-unenhanced.mp4"), n_frames=20, fps=20) if unenhanced else None

    def row(cid, signer, status, video, start, end, score, out_uri, **kw):
        r = {"clip_id": cid, "status": status, "error": None, "output_uri": out_uri, "attempts": 1,
             "reidentified": False, "duration_s": None if out_uri is None else 1.0, "video_uri": video,
             "signer_id": signer, "start_s": start, "end_s": end, "anonymizer": "pixelate"}
        if backend != "none":
            r.update(id_orig_anon=score, id_match_rate=0.0, id_score_kind="euclidean", id_threshold=0.6,
                     id_mean_score=score, expr_fidelity=0.5, hand_fidelity=0.8, warp_error=1.5, face_backend=backend)
        if exposure is not None and out_uri is not None:  # the exposure check's columns: `exposure` = exposed frames
            n = exposure.get(cid, 0)
            r.update(faces_tracked=2, frames_checked=12 + n, exposed_frames=n, max_exposed_run=min(n, 3),
                     exposure_covered=True)
        r.update(kw)
        return r

    file_uri = lambda p: "file://" + p  # noqa: E731
    rows = [
        row("s1_a", "signer1", "ok", src1, 0.0, 1.0, 0.71, file_uri(clips["s1_a"])),
        row("s1_b", "signer1", "ok", src1, 1.0, 2.0, 0.41, file_uri(clips["s1_b"]), reidentified=True,
            **({UNENHANCED_COLUMN: file_uri(unenh)} if unenh else {})),
        row("s2_a", "signer2", "leak", src2, None, None, 0.55, file_uri(clips["s2_a"]), leak=True),
        row("s2_err", "signer2", "error", src2, None, None, None, None, error=EVIL_ERROR, attempts=3,
            **({} if backend == "none" else {"expr_fidelity": None, "hand_fidelity": None, "warp_error": None})),
        # an ok row whose clip was deleted and whose source is gone: placeholders, no crash
        row(EVIL_CLIP, "signer3", "ok", str(corpus / "gone.mp4"), None, None, 0.65,
            file_uri(str(root / "clips" / "gone.mp4"))),
    ]
    for i in range(n_extra):  # many more ok rows, all pointing at the same files
        rows.append(row(f"x{i:05d}", f"signer{4 + i % 50}", "ok", src2, None, None, 0.62 + (i % 97) / 100,
                        file_uri(clips["s2_a"])))
    keys = list(dict.fromkeys(k for r in rows for k in r))  # from_pylist takes the first row's keys only
    table = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    pq.write_table(table, str(root / "metrics" / "metrics.parquet"))
    summary = {"cfg_fp": CFG_FP, "anonymizer": "pixelate", "counts": {}, "finished_at": "2026-11-26T00:00:00+00:00",
               "reseeded_clips": []}
    if backend != "none":
        summary["reid"] = {
            "id_score_kind": "euclidean", "id_threshold": 0.6, "n_tested": 4, "n_left_out": 1, "n_no_face": 0,
            "reid_top1": 0.25, "reid_top1_originals": 1.0, "reid_chance": 0.5,
            "per_signer": {"signer1": {"id_orig_orig_xclip": 0.123, "id_orig_anon": 0.56, "n_clips": 2},
                           "signer2": {"id_orig_orig_xclip": 0.2345, "id_orig_anon": 0.55, "n_clips": 2},
                           "signer3": {"id_orig_orig_xclip": None, "id_orig_anon": 0.65, "n_clips": 1}},
        }
    (root / "summary.json").write_text(json.dumps(summary))
    storage = Storage(StorageSettings(allowed_read=(str(tmp_path),), allowed_write=(str(out),)))
    return storage, RunLayout(str(out), CFG_FP), root


def test_report_is_self_contained_ranked_and_escaped(tmp_path):
    storage, layout, root = make_run(tmp_path)
    uri = write_report(storage, layout, max_embedded=2, seed=0)
    assert uri == "file://" + str(root / "report.html")
    text = (root / "report.html").read_text()
    page = parse(text)
    assert_self_contained(page, text)
    assert "Private" in text and "do not publish" in text

    imgs = [a["src"] for t, a in page.tags if t == "img"]
    # s1_b (0.41), then s2_a (0.55) are the worst by distance; the random sample takes the 2
    # others with an output; each decodable clip shows 3 frames x (original | anonymized).
    assert page.cards[0].endswith("s1_b") and page.cards[1].endswith("s2_a")
    assert len(page.cards) == 4 and any(c.endswith(EVIL_CLIP) for c in page.cards)
    assert len(imgs) == 3 * 3 * 2
    for src in imgs:
        w, h = _decode_image(src)
        assert h == 160 and w == 214  # 4:3 source at 160 px high (even width)
    # the unreadable clip: placeholder tiles with the reason, and the run goes on
    assert text.count('<div class="ph">not found</div>') == 6

    # failures: every non-ok row; the user's message escaped in the HTML, intact as text
    fails = page.table_with("error")
    assert [r[0] for r in fails[1:]] == ["s2_a", "s2_err"]
    err = next(r for r in fails if r[0] == "s2_err")
    assert err[1] == "error" and err[2] == "3" and err[3] == " ".join(EVIL_ERROR.split())
    assert "<script>" not in text and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;friends&quot;" in text
    assert "<b>odd</b>" not in text and "s3_&lt;b&gt;odd&lt;/b&gt;&amp;id" in text

    # Table 1 and re-identification vs chance
    t1 = page.table_with("Original (id_orig_orig_xclip)")
    by_signer = {r[0]: r for r in t1[1:]}
    assert by_signer["signer1"][1] == "0.123" and by_signer["signer1"][2] == "0.560 same person"
    assert by_signer["signer2"][1] == "0.234" and by_signer["signer3"][1] == "–"
    assert by_signer["signer1"][4] == "1"  # one re-identified clip
    reid = {r[0]: r[1] for r in page.table_with("measure")[1:]}
    assert reid["chance (reid_chance)"] == "50.0 %" and reid["clips tested (n_tested)"] == "4"
    assert reid["anonymized clips whose best gallery is their own signer (reid_top1)"].startswith("25.0 %")
    assert "lower = more alike" in text and "threshold 0.6" in text

    # counts: by status, leak / re-identified / face_lost; fidelity stats
    assert {r[0]: r[1] for r in page.table_with("clips")[1:] if len(r) == 2} == {"error": "1", "leak": "1", "ok": "3"}
    stats = {r[0]: r for r in page.table_with("median")[1:]}
    assert stats["expr_fidelity"][1] == "4" and stats["warp_error"][4] == "1.500"
    assert text.count("<svg") == 4  # identity + 3 fidelity histograms

    # every other clip is listed with a relative link (local output)
    assert "All other clips (1)" in text
    hrefs = [a["href"] for t, a in page.tags if t == "a" and not a["href"].startswith("#")]
    assert hrefs and all(not h.startswith(("/", "file:")) for h in hrefs)
    assert "clips/s1_b-0123456789ab.mp4" in hrefs and "../../corpus/session1.mp4" in hrefs
    assert not (root / "embeddings").exists()


def test_report_stays_small_at_2000_clips(tmp_path):
    storage, layout, root = make_run(tmp_path, n_extra=1995)
    write_report(storage, layout, max_embedded=12, seed=7)
    text = (root / "report.html").read_text()
    page = parse(text)
    assert_self_contained(page, text)
    assert len(page.cards) == 24  # only max_embedded worst + max_embedded random clips are embedded
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) <= 24 * 3 * 2
    size = (root / "report.html").stat().st_size
    table_bytes = size - sum(len(s) for s in imgs)
    print(f"report of 2,000 rows: {size} bytes, {len(imgs)} images, {table_bytes} bytes without images")
    assert size < 1_200_000 and table_bytes / 2000 < 300
    # the seeded sample is reproducible
    write_report(storage, layout, max_embedded=12, seed=7)
    assert parse((root / "report.html").read_text()).cards == page.cards


def test_report_without_face_analysis(tmp_path):
    storage, layout, root = make_run(tmp_path, backend="none")
    write_report(storage, layout, max_embedded=2)
    text = (root / "report.html").read_text()
    page = parse(text)
    assert_self_contained(page, text)
    assert "Identity: not measured (faces.backend: none)" in text
    assert "Expression and hand fidelity: not measured" in text and "re-identified: not measured" in text
    assert len(page.cards) == 2 and "most alike" not in text  # a random sample only, no ranking
    assert [r[0] for r in page.table_with("error")[1:]] == ["s2_a", "s2_err"]


def test_optional_third_column_without_enhancement(tmp_path):
    storage, layout, root = make_run(tmp_path, unenhanced=True)
    write_report(storage, layout, max_embedded=1)
    page = parse((root / "report.html").read_text())
    assert page.cards[0].endswith("s1_b")
    heads = [a for t, a in page.tags if t == "img" and "output_uri_unenhanced" in a.get("alt", "")]
    assert len(heads) == 3
    assert "anonymized, no face enhancement" in (root / "report.html").read_text()


def test_cosine_ranks_highest_first():
    from corpus_anon.run.report import _pick

    rows = [{"clip_id": c, "output_uri": "file:///x", "id_orig_anon": s} for c, s in (("a", 0.1), ("b", 0.6), ("c", 0.3))]
    worst, sample = _pick(rows, "cosine", 2, 0)
    assert [r["clip_id"] for r in worst] == ["b", "c"] and [r["clip_id"] for r in sample] == ["a"]
    worst, _ = _pick(rows, "euclidean", 2, 0)
    assert [r["clip_id"] for r in worst] == ["a", "c"]


def test_missing_metrics_is_one_sentence(tmp_path):
    storage = Storage(StorageSettings(unrestricted=True))
    with pytest.raises(FileNotFoundError, match="has not finished"):
        write_report(storage, RunLayout(str(tmp_path), "nope"))


def test_report_imports_nothing_heavy(tmp_path):
    storage, layout, root = make_run(tmp_path)
    code = (
        "import sys\n"
        "from corpus_anon.run.report import write_report\n"
        "from corpus_anon.io.records import RunLayout\n"
        "from corpus_anon.io.storage import Storage, StorageSettings\n"
        f"write_report(Storage(StorageSettings(unrestricted=True)), RunLayout({layout.output!r}, {CFG_FP!r}))\n"
        "heavy = ('torch', 'diffusers', 'insightface', 'onnxruntime', 'cv2', 'transformers', 'PIL')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"write_report imported: {out.stdout.strip()}"


def test_clips_the_gate_never_checked_are_counted():
    from corpus_anon.run.report import _flags, _section_facts

    rows = [{"clip_id": "a", "status": "ok", "output_uri": "file:///a.mp4", "id_orig_anon": None},
            {"clip_id": "b", "status": "ok", "output_uri": "file:///b.mp4", "id_orig_anon": 0.7},
            {"clip_id": "c", "status": "error", "output_uri": None, "id_orig_anon": None}]
    page = _section_facts(rows, {}, measured=True)
    assert '<b>1</b>identity not checked: no face found in the original' in page
    assert '<b>2</b>release candidates' in page and '<b>1</b>error' in page
    assert "no face found" in _flags(rows[0]) and _flags(rows[1]) == "" and _flags(rows[2]) == ""


def test_report_counts_exposed_clips_and_frames(tmp_path):
    """The exposure check in the report: counts, its explanation, the exposed clips first in the
    contact sheet and in their own table, the reason in the failures list, a badge per clip."""
    storage, layout, root = make_run(tmp_path, exposure={"s2_a": 5, EVIL_CLIP: 0})
    write_report(storage, layout, max_embedded=2, seed=0)
    text = (root / "report.html").read_text()
    page = parse(text)
    assert_self_contained(page, text)
    assert "<b>1</b>exposed: clips with an original face still recognizable" in text
    assert "<b>5</b>exposed frames, all clips" in text
    assert "anyone else in the picture" in text and "gate.max_gap_frames" in text
    ex = {r[0]: r[1] for r in page.table_with("exposure check")[1:]}
    assert ex["clips checked"] == "4" and ex["clips with exposed frames"] == "1 leak"
    assert ex["exposed frames, all clips (exposed_frames)"] == "5"
    assert ex["original faces tracked, all clips (faces_tracked)"] == "8"
    rows = page.table_with("exposed frames")[1:]
    assert [r[0] for r in rows] == ["s2_a"] and rows[0][3:6] == ["5", "3", "2"]
    assert page.cards[0].endswith("s2_a")  # exposed first, though s1_b has the lower distance
    assert "exposed clips, then lowest id_orig_anon first" in text
    fails = {r[0]: r[3] for r in page.table_with("error")[1:]}
    assert fails["s2_a"].startswith("exposure check: an original face is still recognizable on 5 frame(s), "
                                    "longest run 3; identity gate:")
    assert "exposed on 5 frames" in text
    stats = {r[0]: r for r in page.table_with("median")[1:]}
    assert stats["exposed_frames"][1] == "4" and stats["exposed_frames"][6] == "5.000"


def test_report_takes_the_summarys_exposure_counts(tmp_path):
    storage, layout, root = make_run(tmp_path, exposure={"s2_a": 5})
    summary = json.loads((root / "summary.json").read_text())
    summary["exposure"] = {"clips_checked": 4, "clips_exposed": 1, "exposed_frames": 5, "faces_tracked": 8,
                           "clips_not_covered": 1, "exposed_clips": ["s2_a"], "not_covered_clips": ["s1_a"]}
    (root / "summary.json").write_text(json.dumps(summary))
    write_report(storage, layout, max_embedded=1)
    page = parse((root / "report.html").read_text())
    ex = {r[0]: r[1] for r in page.table_with("exposure check")[1:]}
    assert ex["clips where some face was not checked within gate.max_gap_frames"] == "1"


def test_exposure_flags():
    from corpus_anon.run.report import _flags

    assert _flags({"status": "ok", "exposed_frames": 0, "exposure_covered": True}) == ""
    flags = _flags({"status": "leak", "exposed_frames": 1, "exposure_covered": False})
    assert "exposed on 1 frame<" in flags and "exposure check incomplete" in flags and "leak" in flags


def test_thumbnails_open_sources_through_the_container_allow_list(tmp_path):
    """The report reads originals to show them: an FFmpeg concat script among them yields no
    thumbnail and one sentence, and never the file it names; a real video still gives thumbnails."""
    from corpus_anon.run.thumbs import thumbnails
    from corpus_anon.io.storage import Storage, StorageSettings
    from tests.media import make_video

    make_video(str(tmp_path / "victim.mp4"), 12, 12, (96, 64))
    (tmp_path / "evil.mp4").write_text("ffconcat version 1.0\nfile victim.mp4\n")
    storage = Storage(StorageSettings(unrestricted=True))
    thumbs, why = thumbnails(storage, str(tmp_path / "victim.mp4"), 0.0, None, 32)
    assert why is None and any(t for t in thumbs)
    thumbs, why = thumbnails(storage, str(tmp_path / "evil.mp4"), 0.0, None, 32)
    assert thumbs == [] and "allowed video container" in why, why


def test_report_shows_the_marker_panel_and_the_tradeoff(tmp_path):
    """Landmark fidelity columns: a per-clip panel of the marker series (original vs anonymized), the
    trade-off view (markers against hands) and the distributions; the page stays self-contained."""
    from corpus_anon.actor.metrics import nmm_series_json

    storage, layout, root = make_run(tmp_path)
    path = root / "metrics" / "metrics.parquet"
    rows = pq.read_table(str(path)).to_pylist()
    t = list(range(0, 40, 4))
    o = [[0.14 + 0.02 * (k % 3), 0.3, 0.03 + 0.01 * (k % 2), 0.45] for k in range(len(t))]
    a = [[0.15, 0.31, 0.04, 0.44] if k != 3 else [float("nan")] * 4 for k in range(len(t))]
    for i, r in enumerate(rows):
        done = r["status"] in ("ok", "leak")
        r.update(nmm_corr=0.1 * i if done else None, nmm_brow_corr=0.05 if done else None, nmm_mouth_corr=None,
                 hand_lm_err=0.08 if done else None, hand_presence_agree=0.9 if done else None,
                 hand_lm_frames=(0 if r["clip_id"] == "s1_a" else 7) if done else None,
                 hand_frames_orig=8 if done else None,
                 hand_lm_recall=(0.0 if r["clip_id"] == "s1_a" else 7 / 8) if done else None,
                 landmark_frames=10 if done else 0,
                 landmark_note="" if done else "landmarks.enabled is false: no landmark model ran",
                 nmm_series=nmm_series_json(t, o, a) if done else None)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    write_report(storage, layout)
    text = (root / "report.html").read_text()
    page = parse(text)
    assert_self_contained(page, text)
    assert "facial markers vs hands kept" in text and "markers lost, hands kept" in text
    assert text.count("<circle") == 4  # the four finished clips (the error row has no values)
    assert "hands kept: hand_lm_recall × (1 − hand_lm_err)" in text
    assert "s1_a: nmm_corr 0.000, hands 0.000" in text  # no hand kept: at the left edge
    assert "s1_b: nmm_corr 0.100, hands 0.805" in text  # 7/8 of the hand frames x (1 - 0.08)
    # per-clip panels: brow raise and mouth opening, each with the original and the anonymized line
    assert text.count('aria-label="brow raise, original and anonymized"') == 4
    assert text.count('aria-label="mouth opening, original and anonymized"') == 4
    panel = text[text.index('aria-label="brow raise, original and anonymized"'):]
    orig_path = panel[panel.index('<path d="') + 9:panel.index('"', panel.index('<path d="') + 9)]
    assert orig_path.count("M") == 1 and orig_path.count("L") == len(t) - 1  # every original point drawn
    anon_at = panel.index('<path d="', panel.index('<path d="') + 9) + 9
    assert panel[anon_at:panel.index('"', anon_at)].count("M") == 2  # the anonymized line breaks at the gap
    stats = {r[0]: r for r in page.table_with("median")[1:]}
    assert stats["nmm_corr"][1] == "4" and stats["hand_lm_err"][3] == "0.080"
    assert "landmarks.enabled is false: no landmark model ran (1 clip)" in text
    others = page.table_with("markers")
    assert others[0][5:7] == ["markers", "hand lm"]


def test_the_tradeoff_says_where_the_median_clip_lies_and_counts_each_quadrant(tmp_path):
    """A pixelate-like pass (hands kept, markers lost on most clips): the corners carry their clip
    counts, a cross marks the median clip, and the caption names its quadrant in words."""
    storage, layout, root = make_run(tmp_path)
    path = root / "metrics" / "metrics.parquet"
    rows = pq.read_table(str(path)).to_pylist()
    values = iter([(0.05, 1.0), (0.1, 0.9), (-0.2, 0.95), (0.8, 0.2)])  # (nmm_corr, hand_lm_recall)
    for r in rows:
        done = r["status"] in ("ok", "leak")
        corr, recall = next(values) if done else (None, None)
        r.update(nmm_corr=corr, hand_lm_recall=recall, hand_lm_err=0.05 if done else None,
                 landmark_frames=10 if done else 0)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    write_report(storage, layout)
    text = (root / "report.html").read_text()
    assert_self_contained(parse(text), text)
    assert text.count("<circle") == 4
    assert ">markers lost, hands kept (3)<" in text and ">hands lost, markers kept (1)<" in text
    assert ">both kept (0)<" in text and ">both lost (0)<" in text
    # hands kept = recall x (1 - 0.05): 0.95, 0.855, 0.9025, 0.19 -> median 0.879; markers median 0.075
    assert "median clip: nmm_corr 0.075, hands 0.879" in text
    assert "<b>The median clip: markers lost, hands kept (markers kept 0.075, hands kept 0.879).</b>" in text
    assert "4 clips: 3 markers lost, hands kept; 1 hands lost, markers kept (kept = at least 0.5" in text
    assert "drawn for the clips of this sheet only" in text  # the per-clip marker panels' scope
