"""Released checkpoints: the shipped manifest, `fetch` from a local server on 127.0.0.1 (verify, resume with
Range, refuse a mismatch, store atomically) and `--ckpt NAME` resolving to the fetched file, never downloading."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from densecl_bench import released
from densecl_bench.checkpoint import CheckpointError, load_checkpoint
from densecl_bench.cli import main
from densecl_bench.regress import load_reference, resolve
from densecl_bench.released import FetchError


def tiny_checkpoint() -> bytes:
    """A torchvision-layout file holding one resnet18 tensor (loads with allow_partial)."""
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.arange(64 * 3 * 7 * 7, dtype=torch.float32).reshape(64, 3, 7, 7)}, buf)
    return buf.getvalue()


PAYLOAD = tiny_checkpoint()
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


class Server:
    """Serves PAYLOAD at /<name>.pth; honours Range unless told not to; can cut a response halfway."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.cut_next = False
        self.honour_range = True
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                server.requests.append(dict(self.headers))
                start = 0
                if server.honour_range and self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
                    if start >= len(PAYLOAD):
                        self.send_response(416)
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
                else:
                    self.send_response(200)
                body = PAYLOAD[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.cut_next:
                    server.cut_next = False
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the client sees a short read
                    return
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def manifest(server, tmp_path, monkeypatch):
    """A manifest of two entries on the local server (prefix hash, full hash) and a bad one; a fresh home."""
    monkeypatch.setenv("DENSECL_BENCH_HOME", str(tmp_path / "home"))
    server.requests.clear()
    server.cut_next, server.honour_range = False, True
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps({"model": "tiny", "results": {"voc07_svm": {"svm": 1.0}}}))
    entry = {"layout": "torchvision", "reference": "ref.json", "source": "test", "tolerances": {"voc07_svm": 0.3}}
    data = {"tiny_prefix": entry | {"url": f"{server.url}/tiny-{DIGEST[:8]}.pth", "sha256": DIGEST[:8]},
            "tiny_full": entry | {"url": f"{server.url}/tiny.pth", "sha256": DIGEST},
            "tiny_bad": entry | {"url": f"{server.url}/tiny.pth", "sha256": "0badc0de"}}
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump(data))
    monkeypatch.setenv(released.MANIFEST_ENV, str(path))
    return path


def fetch_cli(*args: str):
    return CliRunner().invoke(main, ["fetch", "--no-progress", *args])


def test_fetch_verifies_the_published_prefix_and_stores_once(manifest, server):
    result = fetch_cli("tiny_prefix")
    assert result.exit_code == 0, result.output
    stored = released.get("tiny_prefix").path
    assert stored.read_bytes() == PAYLOAD and stored.parent == Path(released.weights_dir())
    assert sorted(p.name for p in stored.parent.iterdir()) == ["tiny_prefix.pth"]  # no .part left behind
    assert "verified sha256" in result.output and "Range" not in server.requests[0]
    again = fetch_cli("tiny_prefix")
    assert "already fetched" in again.output and len(server.requests) == 1  # nothing downloaded twice
    stored.write_bytes(b"a re-pinned release")  # the stored file no longer matches the manifest
    assert "fetching it again" in fetch_cli("tiny_prefix").output and stored.read_bytes() == PAYLOAD


def test_fetch_resumes_an_interrupted_download_with_range(manifest, server):
    server.cut_next = True
    with pytest.raises(FetchError, match="interrupted after .* run the same command again to resume"):
        released.fetch(released.get("tiny_full"), progress=False, echo=lambda _: None)
    part = released.get("tiny_full").path.with_name("tiny_full.pth.part")
    half = part.stat().st_size
    assert 0 < half < len(PAYLOAD) and not released.get("tiny_full").path.exists()
    released.fetch(released.get("tiny_full"), progress=False, echo=lambda _: None)
    assert server.requests[-1]["Range"] == f"bytes={half}-"
    assert released.get("tiny_full").path.read_bytes() == PAYLOAD and not part.exists()


def test_a_server_that_ignores_range_restarts_the_download(manifest, server):
    part = released.get("tiny_full").path.with_name("tiny_full.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes")
    server.honour_range = False
    released.fetch(released.get("tiny_full"), progress=False, echo=lambda _: None)
    assert server.requests[-1]["Range"] == "bytes=11-"
    assert released.get("tiny_full").path.read_bytes() == PAYLOAD


def test_fetch_refuses_a_mismatch_and_stores_nothing(manifest, server):
    result = fetch_cli("tiny_bad")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert f"sha256 mismatch: expected 0badc0de…, got {DIGEST}" in result.output
    weights = released.weights_dir()
    assert not any(weights.iterdir())  # neither the file nor a .part to resume from
    assert fetch_cli("nope").output.startswith("error: 'nope' is not a released checkpoint (known: tiny_bad, tiny_full, tiny_prefix;")
    assert fetch_cli().exit_code == 2  # a name or --all


def test_ckpt_name_resolves_to_the_fetched_file_and_never_downloads(manifest, server):
    with pytest.raises(FetchError, match="not fetched yet .* run `densecl-bench fetch tiny_full` first"):
        load_checkpoint("tiny_full", arch="resnet18", allow_partial=True)
    result = CliRunner().invoke(main, ["inspect", "tiny_full", "--arch", "resnet18", "--allow-partial"])
    assert result.exit_code == 2 and "densecl-bench fetch tiny_full" in result.output
    assert server.requests == []
    assert fetch_cli("tiny_full").exit_code == 0
    loaded = load_checkpoint("tiny_full", arch="resnet18", allow_partial=True)
    assert loaded.path == str(released.get("tiny_full").path) and loaded.sha256 == DIGEST
    assert torch.equal(loaded.state_dict["conv1.weight"].flatten()[:3], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint("not_a_release.pth")


def test_a_released_name_is_a_reference_with_its_tolerances(manifest):
    reference, tolerances = load_reference("tiny_full")
    assert reference["model"] == "tiny" and tolerances == {"voc07_svm": 0.3}
    assert load_reference(manifest.parent / "ref.json")[1] == {"voc07_svm": 0.3}  # by path too


def test_the_shipped_manifest():
    """Every entry names a file whose name carries its hash prefix, a reference JSON that exists, tolerances
    that parse and say why, and the DenseCL entry is the file the seed's numbers belong to."""
    releases = released.load_manifest(released.MANIFEST)
    assert {"densecl_r50_8xb32-coslr-200e", "mocov2_r50_8xb32-coslr-200e", "supervised_r50_torchvision"} <= set(releases)
    for release in releases.values():
        assert release.url.startswith("https://") and release.url.endswith(f"-{release.sha256[:8]}.pth")
        reference = json.loads(release.reference.read_text())
        assert reference["results"] and release.source
        for bench, metrics in reference["results"].items():
            for metric in metrics or {}:
                tol = resolve(release.tolerances, bench, metric)
                assert tol.abs >= 0.5 and tol.why, (release.name, bench, metric)
    densecl = releases["densecl_r50_8xb32-coslr-200e"]
    assert densecl.url.endswith("_20211214-1efb342c.pth") and densecl.reference.name == (
        "densecl_r50_8xb32-coslr-200e.json")
    assert released.MANIFEST.parent.joinpath("reference").resolve() == (
        Path(__file__).resolve().parent.parent / "results" / "reference")
    listing = CliRunner().invoke(main, ["released"])
    assert listing.exit_code == 0 and "densecl_r50_8xb32-coslr-200e  (DenseCL)" in listing.output
    assert "1efb342c… (published prefix)" in listing.output
    assert CliRunner().invoke(main, ["released", "--names"]).output.split() == list(releases)


def test_a_complete_part_file_is_verified_on_the_servers_416(manifest, server):
    part = released.get("tiny_full").path.with_name("tiny_full.pth.part")
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD)  # killed after the last byte, before the rename
    released.fetch(released.get("tiny_full"), progress=False, echo=lambda _: None)
    assert server.requests[-1]["Range"] == f"bytes={len(PAYLOAD)}-"
    assert released.get("tiny_full").path.read_bytes() == PAYLOAD and not part.exists()
