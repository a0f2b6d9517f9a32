from __future__ import annotations

from serve_app.image_store import LocalImageStore


def test_names_are_random_and_lookups_reject_paths(tmp_path):
    store = LocalImageStore(str(tmp_path / "images"))
    a, b = store.save(b"png-bytes", "png"), store.save(b"jpeg-bytes", "jpeg")
    assert a != b and len(a) == 36 and a.endswith(".png")
    path, media = store.lookup(a)
    assert path.read_bytes() == b"png-bytes" and media == "image/png"
    assert store.lookup(b)[1] == "image/jpeg"
    (tmp_path / "secret.png").write_bytes(b"secret")
    for name in ["../secret.png", "..%2Fsecret.png", "secret.png", a[:-4], a + "/", "/etc/passwd", ""]:
        assert store.lookup(name) is None, name
    assert store.lookup("A" * 32 + ".png") is None  # well-formed but absent
