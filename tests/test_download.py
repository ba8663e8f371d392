"""Downloads against a local HTTP server: resume, checksums, safe extraction, dataset layouts."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vl2v import download
from vl2v.download import build_terra_incognita, download_dataset, fetch, safe_extract
from vl2v.runtime import UserError

PAYLOAD = bytes(range(256)) * 64  # 16 KiB, every byte value, so an offset error shows


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files`; honours `Range: bytes=N-` unless `server.honour_range` is False."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path == "/truncated":  # promises more bytes than it sends
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:1000])
            return
        if self.path not in srv.files:
            self.send_error(404)
            return
        data, ctype = srv.files[self.path]
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(m.group(1)) if m and srv.honour_range else 0
        if start >= len(data) and m and srv.honour_range:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server():
    """A local server; add files with `server.files[path] = (bytes, content_type)`."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.requests, srv.honour_range = {}, [], True
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            tf.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


# --- fetch ------------------------------------------------------------------------------------


def test_fetch_full_download_verifies_and_reports_progress(server, tmp_path):
    server.files["/a.bin"] = (PAYLOAD, "application/octet-stream")
    seen = []
    out = fetch(
        f"{server.url}/a.bin",
        tmp_path / "a.bin",
        sha256=sha(PAYLOAD),
        size=len(PAYLOAD),
        progress=lambda done, total: seen.append((done, total)),
    )
    assert out.read_bytes() == PAYLOAD
    assert not (tmp_path / "a.bin.part").exists()
    assert seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    # A second call trusts the finished file and asks nothing of the server.
    fetch(f"{server.url}/a.bin", out)
    assert len(server.requests) == 1


def test_fetch_resumes_partial_file_with_range(server, tmp_path):
    server.files["/a.bin"] = (PAYLOAD, "application/octet-stream")
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:5000])
    seen = []
    out = fetch(
        f"{server.url}/a.bin",
        tmp_path / "a.bin",
        sha256=sha(PAYLOAD),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert server.requests == [("/a.bin", "bytes=5000-")]
    assert out.read_bytes() == PAYLOAD
    assert seen[0][0] > 5000 and seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_fetch_restarts_when_server_ignores_range(server, tmp_path):
    server.files["/a.bin"] = (PAYLOAD, "application/octet-stream")
    server.honour_range = False
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:5000])
    out = fetch(f"{server.url}/a.bin", tmp_path / "a.bin", sha256=sha(PAYLOAD))
    assert server.requests == [("/a.bin", "bytes=5000-")]
    assert out.read_bytes() == PAYLOAD  # rewritten from byte 0, not appended


def test_fetch_complete_part_file_gets_416_and_is_kept(server, tmp_path):
    server.files["/a.bin"] = (PAYLOAD, "application/octet-stream")
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    out = fetch(f"{server.url}/a.bin", tmp_path / "a.bin", sha256=sha(PAYLOAD))
    assert out.read_bytes() == PAYLOAD


@pytest.mark.parametrize("check", ["sha256", "size"])
def test_fetch_mismatch_raises_and_leaves_no_file(server, tmp_path, check):
    server.files["/a.bin"] = (PAYLOAD, "application/octet-stream")
    wrong = {"sha256": "0" * 64} if check == "sha256" else {"size": len(PAYLOAD) + 1}
    with pytest.raises(UserError) as err:
        fetch(f"{server.url}/a.bin", tmp_path / "a.bin", **wrong)
    msg = str(err.value)
    assert "a.bin" in msg
    if check == "sha256":
        assert "0" * 64 in msg and sha(PAYLOAD) in msg
    else:
        assert str(len(PAYLOAD) + 1) in msg and str(len(PAYLOAD)) in msg
    assert list(tmp_path.iterdir()) == []


def test_fetch_interrupted_keeps_part_for_resume(server, tmp_path):
    with pytest.raises(UserError, match="interrupted.*rerun"):
        fetch(f"{server.url}/truncated", tmp_path / "t.bin", timeout=5)
    assert (tmp_path / "t.bin.part").read_bytes() == PAYLOAD[:1000]
    assert not (tmp_path / "t.bin").exists()


def test_fetch_unreachable_host_is_one_line(tmp_path, closed_port):
    with pytest.raises(UserError) as err:
        fetch(f"http://127.0.0.1:{closed_port}/x.zip", tmp_path / "x.zip", timeout=2)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"127.0.0.1:{closed_port}" in msg and "x.zip" in msg
    assert '"Datasets"' in msg and "<domain>/<class>/<image>" in msg


def test_fetch_follows_google_drive_confirm_page(server, tmp_path):
    page = (
        '<html><form id="download-form" action="/real" method="get">'
        '<input type="hidden" name="id" value="abc">'
        '<input type="hidden" name="confirm" value="t"></form></html>'
    )
    server.files["/uc"] = (page.encode(), "text/html; charset=utf-8")
    server.files["/real?id=abc&confirm=t"] = (PAYLOAD, "application/zip")
    out = fetch(f"{server.url}/uc", tmp_path / "d.zip", sha256=sha(PAYLOAD))
    assert out.read_bytes() == PAYLOAD
    assert [p for p, _ in server.requests] == ["/uc", "/real?id=abc&confirm=t"]


def test_fetch_html_without_form_explains(server, tmp_path):
    server.files["/uc"] = (b"<html>quota exceeded</html>", "text/html")
    with pytest.raises(UserError, match="web page instead of d.zip.*browser"):
        fetch(f"{server.url}/uc", tmp_path / "d.zip")
    assert not (tmp_path / "d.zip").exists()


def test_google_drive_links_are_rewritten():
    url = download._direct_url("https://drive.google.com/uc?id=ABC")
    assert url == "https://drive.usercontent.google.com/download?id=ABC&export=download&confirm=t"
    assert download._direct_url("http://csr.bu.edu/a.zip") == "http://csr.bu.edu/a.zip"


# --- safe_extract -----------------------------------------------------------------------------


def test_safe_extract_zip_and_tar(tmp_path):
    (tmp_path / "a.zip").write_bytes(make_zip({"d/c/img.png": b"png"}))
    safe_extract(tmp_path / "a.zip", tmp_path / "z")
    assert (tmp_path / "z/d/c/img.png").read_bytes() == b"png"
    make_tar(
        tmp_path / "a.tar.gz",
        [tar_member("d/c/img.png"), tar_member("d/link", tarfile.SYMTYPE, "c")],
    )
    safe_extract(tmp_path / "a.tar.gz", tmp_path / "t")
    assert (tmp_path / "t/d/c/img.png").read_bytes() == b"x"


def test_safe_extract_refuses_zip_escape(tmp_path):
    (tmp_path / "bad.zip").write_bytes(make_zip({"ok.txt": b"ok", "../evil": b"evil"}))
    with pytest.raises(UserError, match=r"'\.\./evil'"):
        safe_extract(tmp_path / "bad.zip", tmp_path / "out")
    assert not (tmp_path / "evil").exists()
    assert list((tmp_path / "out").iterdir()) == []  # checked before anything was written


@pytest.mark.parametrize(
    "member",
    [
        tar_member("/tmp/vl2v-evil-abs"),
        tar_member("a/../../evil"),
        tar_member("link", tarfile.SYMTYPE, "../.."),
        tar_member("abslink", tarfile.SYMTYPE, "/etc"),
        tar_member("hard", tarfile.LNKTYPE, "../outside.txt"),
    ],
    ids=["absolute", "dotdot", "symlink", "abs-symlink", "hardlink"],
)
def test_safe_extract_refuses_tar_escape(tmp_path, member):
    archive = make_tar(tmp_path / "bad.tar.gz", [tar_member("ok.txt"), member])
    with pytest.raises(UserError, match=re.escape(f"'{member.name}'")):
        safe_extract(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "out"]
    assert list((tmp_path / "out").iterdir()) == []
    assert not Path("/tmp/vl2v-evil-abs").exists()


# --- registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("typo, nearest", [("pacs", "PACS"), ("OfficeHom", "OfficeHome")])
def test_unknown_dataset_lists_names_and_nearest(tmp_path, typo, nearest):
    with pytest.raises(UserError) as err:
        download_dataset(typo, tmp_path)
    msg = str(err.value)
    assert f"Unknown dataset '{typo}'. Did you mean '{nearest}'?" in msg
    assert "PACS, VLCS, OfficeHome, TerraIncognita, DomainNet" in msg


def test_registry_covers_the_five_domainbed_datasets():
    assert list(download.SOURCES) == ["PACS", "VLCS", "OfficeHome", "TerraIncognita", "DomainNet"]
    assert len(download.SOURCES["DomainNet"].files) == 7  # 6 domain zips + duplicates list


# --- dataset layouts --------------------------------------------------------------------------


def test_build_terra_incognita(tmp_path):
    images = tmp_path / "eccv_18_all_images_sm"
    images.mkdir()
    for name in "abcde":
        (images / f"{name}.jpg").write_bytes(name.encode())
    categories = [{"id": 1, "name": "bobcat"}, {"id": 2, "name": "car"}, {"id": 3, "name": "empty"}]
    split1 = {
        "categories": categories,
        "images": [
            {"id": "a", "file_name": "a.jpg", "location": 38},  # int location
            {"id": "b", "file_name": "b.jpg", "location": "100"},  # two kept labels
            {"id": "c", "file_name": "c.jpg", "location": "7"},  # location not kept
        ],
        "annotations": [
            {"image_id": "a", "category_id": 1},
            {"image_id": "b", "category_id": 1},
            {"image_id": "b", "category_id": 3},
            {"image_id": "c", "category_id": 1},
        ],
    }
    split2 = {
        "info": {"version": "x"},
        "categories": categories,
        "images": [
            {"id": "d", "file_name": "d.jpg", "location": 43},  # class not kept
            {"id": "e", "file_name": "e.jpg", "location": 46},
        ],
        "annotations": [{"image_id": "d", "category_id": 2}, {"image_id": "e", "category_id": 3}],
    }
    files = []
    for i, data in enumerate([split1, split2]):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(data))
    counts = build_terra_incognita(images, files, tmp_path / "out")
    found = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.jpg"))
    assert found == [
        "location_100/bobcat/b.jpg",
        "location_100/empty/b.jpg",
        "location_38/bobcat/a.jpg",
        "location_46/empty/e.jpg",
    ]
    assert counts == {
        "location_38": {"bobcat": 1},
        "location_100": {"bobcat": 1, "empty": 1},
        "location_46": {"empty": 1},
    }
    assert (tmp_path / "out/location_38/bobcat/a.jpg").read_bytes() == b"a"


def pacs_zip() -> bytes:
    domains = download.SOURCES["PACS"].domains
    files = {
        f"kfold/{d}/{c}/{i}.jpg": f"{d}{c}{i}".encode()
        for d in domains
        for c in ("dog", "horse")
        for i in range(2)
    }
    return make_zip(files)


def test_download_dataset_end_to_end(server, tmp_path, monkeypatch):
    data = pacs_zip()
    server.files["/PACS.zip"] = (data, "application/zip")
    source = dataclasses.replace(
        download.SOURCES["PACS"],
        files=(download.RemoteFile(f"{server.url}/PACS.zip", "PACS.zip", sha256=sha(data)),),
    )
    monkeypatch.setitem(download.SOURCES, "PACS", source)
    out = download_dataset("PACS", tmp_path)
    assert out == tmp_path / "PACS"
    assert (out / "sketch/horse/1.jpg").read_bytes() == b"sketchhorse1"
    assert len(list(out.rglob("*.jpg"))) == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PACS"]  # work folder cleaned up
    assert download_dataset("PACS", tmp_path) == out  # idempotent: no second request
    assert len(server.requests) == 1


def test_download_dataset_domainnet_removes_duplicates(server, tmp_path, monkeypatch):
    files = []
    for domain in ("clipart", "sketch"):
        zipped = make_zip({f"{domain}/cat/{i}.jpg": b"img" for i in range(3)})
        server.files[f"/{domain}.zip"] = (zipped, "application/zip")
        files.append(download.RemoteFile(f"{server.url}/{domain}.zip", f"{domain}.zip"))
    dupes = b"clipart/cat/1.jpg\nsketch/cat/2.jpg\n../../escape.jpg\nsketch/cat/missing.jpg\n"
    server.files["/dupes.txt"] = (dupes, "text/plain")
    files.append(download.RemoteFile(f"{server.url}/dupes.txt", "domain_net_duplicates.txt"))
    source = dataclasses.replace(
        download.SOURCES["DomainNet"], files=tuple(files), domains=("clipart", "sketch")
    )
    monkeypatch.setitem(download.SOURCES, "DomainNet", source)
    out = download_dataset("DomainNet", tmp_path)
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert found == [
        "clipart/cat/0.jpg",
        "clipart/cat/2.jpg",
        "sketch/cat/0.jpg",
        "sketch/cat/1.jpg",
    ]


def test_download_dataset_offline_names_host_and_layout(tmp_path, monkeypatch, closed_port):
    source = dataclasses.replace(
        download.SOURCES["VLCS"],
        files=(download.RemoteFile(f"http://127.0.0.1:{closed_port}/VLCS.tar.gz", "VLCS.tar.gz"),),
    )
    monkeypatch.setitem(download.SOURCES, "VLCS", source)
    with pytest.raises(UserError) as err:
        download_dataset("VLCS", tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert f"Cannot reach 127.0.0.1:{closed_port}" in msg
    assert f"{tmp_path / 'VLCS'}/<domain>/<class>/<image>" in msg
    assert "Caltech101, LabelMe, SUN09, VOC2007" in msg and 'README section "Datasets"' in msg
    assert f"save VLCS.tar.gz in {tmp_path / '.vl2v-download' / 'VLCS'}" in msg
    assert not (tmp_path / "VLCS").exists()


def test_download_dataset_refuses_incomplete_existing_folder(tmp_path):
    (tmp_path / "PACS/photo/dog").mkdir(parents=True)
    with pytest.raises(
        UserError, match="lacks the PACS domain folder.*art_painting, cartoon, sketch"
    ):
        download_dataset("PACS", tmp_path)


def test_safe_extract_damaged_archive(tmp_path):
    good = make_tar(tmp_path / "a.tar.gz", [tar_member(f"f{i}") for i in range(50)]).read_bytes()
    (tmp_path / "a.tar.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="damaged.*delete it"):
        safe_extract(tmp_path / "a.tar.gz", tmp_path / "out")
