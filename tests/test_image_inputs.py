"""What clients send as images and masks (app.image_inputs): every accepted form gives the
pixels computed here independently (numpy, Pillow's own operations on the same bytes, the
formulas of the conversions), every bad value is refused naming the field and the setting at
fault without echoing the data, decompression bombs are refused by their declared size
before any pixel is decoded, URLs are fetched only as the settings allow (a local HTTP server
on 127.0.0.1 plays the remote side), and the image routes' body cap holds an image and its
mask at the byte cap while other routes keep theirs."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import json
import math
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps
from PIL.PngImagePlugin import PngInfo

from app import image_inputs
from app.config import Settings
from app.errors import InvalidParameter
from app.image_inputs import (
    base64_chars,
    image_body_cap,
    non_public_kind,
    read_image,
    read_mask,
)

RNG = np.random.default_rng(20)


def settings(**overrides) -> Settings:
    return Settings(**overrides)


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def noise(width: int, height: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


def image_of(value: str | bytes, **overrides) -> Image.Image:
    return asyncio.run(read_image("image", value, settings(**overrides)))


def mask_of(value: str | bytes, convention: str, **overrides) -> Image.Image:
    return asyncio.run(read_mask("mask", value, settings(**overrides), convention=convention))


def refused(value: str | bytes, *, field: str = "image", mask: str | None = None,
            **overrides) -> InvalidParameter:
    with pytest.raises(InvalidParameter) as caught:
        if mask is None:
            asyncio.run(read_image(field, value, settings(**overrides)))
        else:
            asyncio.run(read_mask(field, value, settings(**overrides), convention=mask))
    error = caught.value
    assert error.status == 422 and error.field == field
    assert "Traceback" not in error.message
    return error


# -- the forms of base64 -------------------------------------------------------------------

def test_every_form_of_base64_and_raw_bytes_give_the_same_pixels() -> None:
    pixels = noise(13, 7)
    for length in range(64):  # a text chunk's length such that both cases below are tried
        info = PngInfo()
        info.add_text("c", "x" * length)
        data = encoded(Image.fromarray(pixels), pnginfo=info)
        plain = b64(data)
        urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
        if plain.endswith("=") and ("-" in urlsafe or "_" in urlsafe):
            break
    assert plain.endswith("=")  # so that dropping the padding below changes something
    assert "-" in urlsafe or "_" in urlsafe  # so that the URL-safe alphabet is tried
    forms = {
        "plain": plain,
        "data URL": "data:image/png;base64," + plain,
        "data URL, other type and case": "DATA:application/octet-stream;BASE64," + plain,
        "MIME line breaks": base64.encodebytes(data).decode(),
        "spaces, tabs, CRLF": "  " + "\r\n\t ".join(plain[i:i + 10] for i in range(0, len(plain), 10)) + "\n",
        "URL-safe without padding": urlsafe,
        "raw bytes": data,
    }
    for name, value in forms.items():
        image = image_of(value)
        assert image.mode == "RGB", name
        assert np.array_equal(np.asarray(image), pixels), name


@pytest.mark.parametrize(("value", "rule"), [
    ("", "it is empty"),
    ("   \n", "it is empty"),
    (b"", "it is empty"),
    ("not base64 at all!", "not base64"),
    ("hello", "not base64"),  # 5 characters: no base64 text is 4k+1 long
    ("aGVs*G8=", "not base64"),
    ("aGVsbG8=\u00e9", "not base64"),
    ("====", "holds no bytes"),
    (b64(b"hello world, this is text and not a picture"), "not an image in a format this server reads"),
    (b64(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), "not an image in a format"),
    ("file:///etc/passwd", "scheme 'file' are not read"),
    ("ftp://example.com/a.png", "scheme 'ftp' are not read"),
    ("javascript:alert(1)", "scheme 'javascript' are not read"),
    ("data:image/png,iVBORw0KGgo", "a data: URL must hold base64"),
    ("data:image/png;base64", "a data: URL must hold base64"),
])
def test_values_that_are_not_images_are_refused_naming_the_field(value, rule) -> None:
    error = refused(value)
    assert rule in error.message
    assert error.message.startswith("This server doesn't have image ")


def test_other_fields_are_named_as_given() -> None:
    error = refused("nope!", field="init_images[1]")
    assert error.message.startswith("This server doesn't have init_images[1] ")


def test_a_long_value_is_echoed_only_as_a_short_prefix() -> None:
    junk = RNG.integers(0, 256, size=30000, dtype=np.uint8).tobytes()
    text = b64(junk)
    error = refused(text)
    assert text[:16] in error.message and f"({len(text)} characters)" in error.message
    assert text[16:40] not in error.message and len(error.message) < 400
    raw = refused(junk)
    assert "<30000 bytes>" in raw.message and len(raw.message) < 400


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_a_truncated_image_is_refused(fmt) -> None:
    data = encoded(Image.fromarray(noise(64, 64)), fmt)
    error = refused(b64(data[: len(data) // 2]))
    assert error.message.endswith("the image cannot be decoded: it is truncated or damaged")
    assert np.asarray(image_of(b64(data))).shape == (64, 64, 3)  # whole, the same bytes are read


def test_formats_with_a_risky_or_needless_parser_are_not_read() -> None:
    for fmt in ("ICO", "TGA", "PPM"):  # Pillow reads them; this door does not
        error = refused(encoded(Image.fromarray(noise(16, 16)), fmt))
        assert "not an image in a format this server reads (PNG, JPEG, WebP, GIF, BMP, TIFF" in error.message


# -- caps ----------------------------------------------------------------------------------

def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of all-black rows: a few kB that decode to width*height
    bytes in Pillow (mode "1" holds a byte a pixel)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    row = b"\x00" * (1 + math.ceil(width / 8))
    packer = zlib.compressobj(9)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@pytest.fixture()
def loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every pixel decode (ImageFile.load) Pillow starts, recorded."""
    calls: list = []
    real_load = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


@pytest.mark.parametrize(("width", "height"), [(20000, 20000), (5000, 5000)])
def test_a_decompression_bomb_is_refused_by_its_declared_size_before_decoding(width, height, loads) -> None:
    data = _bomb_png(width, height)
    assert len(data) < 200_000
    assert struct.unpack(">II", data[16:24]) == (width, height)  # what IHDR declares
    idat = data[33 + 8: -12 - 4]  # after IHDR and IDAT's length and kind, before its CRC and IEND
    assert len(zlib.decompress(idat)) == height * (1 + math.ceil(width / 8))  # a real bomb
    started = time.monotonic()
    error = refused(b64(data))
    assert time.monotonic() - started < 2
    assert loads == []  # not a pixel decoded
    assert "(setting CRAFTSERVE_MAX_IMAGE_PIXELS)" in error.message
    assert f"at most {4096 * 4096} pixels" in error.message
    assert str(width * height) in error.message  # (20000² trips Pillow's own limit first)
    assert Image.MAX_IMAGE_PIXELS == 89478485  # Pillow's global left as it was


def test_the_pixel_cap_is_its_own_setting() -> None:
    cap = 64 * 64
    image_of(encoded(Image.fromarray(noise(64, 64))), max_image_pixels=cap)
    error = refused(encoded(Image.fromarray(noise(65, 64))), max_image_pixels=cap)
    assert error.message.endswith(f"it is 65x64 pixels ({65 * 64}); at most {cap} pixels (e.g. 64x64) "
                                  "are accepted per image (setting CRAFTSERVE_MAX_IMAGE_PIXELS)")
    mask = refused(encoded(Image.fromarray(noise(65, 64, 1))), mask="a1111", max_image_pixels=cap,
                   field="mask")
    assert "CRAFTSERVE_MAX_IMAGE_PIXELS" in mask.message


def test_the_byte_cap_is_its_own_setting_for_bytes_and_for_base64() -> None:
    cap = 4096
    small = encoded(Image.fromarray(noise(8, 8)))
    big = encoded(Image.fromarray(noise(48, 48)))  # noise does not compress: > 6 kB
    assert len(small) <= cap < len(big)
    image_of(b64(small), max_image_bytes=cap)
    rule = f"at most {cap} bytes (0.00391 MiB) are accepted per image (setting CRAFTSERVE_MAX_IMAGE_BYTES)"
    assert refused(big, max_image_bytes=cap).message.endswith(f"it is {len(big)} bytes; {rule}")
    assert refused(b64(big), max_image_bytes=cap).message.endswith(f"characters, more than an image can "
                                                                   f"take: {rule}")
    # one byte over: short enough as text, refused once decoded
    one_over = b64(big[: cap + 1])
    assert len(one_over) <= base64_chars(cap)
    assert refused(one_over, max_image_bytes=cap).message.endswith(f"it is {cap + 1} bytes; {rule}")
    assert "CRAFTSERVE_MAX_IMAGE_BYTES" in refused(big, mask="openai", max_image_bytes=cap,
                                                   field="mask").message


# -- conversions ---------------------------------------------------------------------------

def on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255
    return np.round(rgb.astype(np.float64) * a + 255 * (1 - a))


def test_rgba_is_composited_on_white_as_a1111_flattens_init_images() -> None:
    rgb, alpha = noise(24, 16), noise(24, 16, 1)
    alpha[0, :4] = [0, 255, 1, 128]
    image = image_of(encoded(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")))
    got = np.asarray(image).astype(int)
    assert image.mode == "RGB"
    assert np.abs(got - on_white(rgb, alpha)).max() <= 1
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[0, 1]) == tuple(rgb[0, 1])


def test_grey_with_alpha_is_composited_on_white() -> None:
    grey, alpha = noise(10, 10, 1), noise(10, 10, 1)
    image = image_of(encoded(Image.fromarray(np.dstack([grey, alpha]), "LA")))
    expected = on_white(np.dstack([grey] * 3), alpha)
    assert np.abs(np.asarray(image).astype(int) - expected).max() <= 1


def test_a_palette_png_with_a_transparent_entry() -> None:
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    indices = RNG.integers(0, 3, size=(12, 9), dtype=np.uint8)
    source = Image.fromarray(indices, "P")
    source.putpalette(palette)
    data = encoded(source, transparency=1)  # green is transparent
    assert Image.open(io.BytesIO(data)).mode == "P"
    expected = np.array([[255, 0, 0], [255, 255, 255], [0, 0, 255]], dtype=np.uint8)[indices]
    assert np.array_equal(np.asarray(image_of(data)), expected)
    opaque = encoded(source)
    assert np.array_equal(np.asarray(image_of(opaque)),
                          np.array(palette, dtype=np.uint8).reshape(3, 3)[indices])


def test_cmyk_jpeg_is_converted() -> None:
    c, m, y, k = 200, 30, 90, 40
    data = encoded(Image.new("CMYK", (32, 32), (c, m, y, k)), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    expected = np.array([(255 - v) * (255 - k) / 255 for v in (c, m, y)])
    got = np.asarray(image_of(data)).astype(float)
    assert np.abs(got - expected).max() <= 3


def _png_16bit_rgb(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (Pillow writes none)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    height, width, _ = values.shape
    rows = b"".join(b"\x00" + values[r].astype(">u2").tobytes() for r in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def test_16_bit_images_keep_their_high_byte() -> None:
    grey = RNG.integers(0, 65536, size=(9, 11), dtype=np.uint16)
    data = encoded(Image.fromarray(grey))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    assert np.array_equal(np.asarray(image_of(data)), np.dstack([grey >> 8] * 3))
    rgb = RNG.integers(0, 65536, size=(5, 7, 3), dtype=np.uint16)
    assert np.array_equal(np.asarray(image_of(_png_16bit_rgb(rgb))), rgb >> 8)


def test_float_and_one_bit_and_grey_images() -> None:
    ramp = RNG.random((6, 8), dtype=np.float32)
    tiff = encoded(Image.fromarray(ramp, "F"), "TIFF")
    expected = np.round(ramp * 255).astype(np.uint8)
    assert np.abs(np.asarray(image_of(tiff)).astype(int) - np.dstack([expected] * 3)).max() <= 1
    bits = RNG.integers(0, 2, size=(8, 16), dtype=bool)
    one = encoded(Image.fromarray(bits))
    assert Image.open(io.BytesIO(one)).mode == "1"
    assert np.array_equal(np.asarray(image_of(one)), np.dstack([bits * 255] * 3))
    grey = noise(7, 5, 1)
    assert np.array_equal(np.asarray(image_of(encoded(Image.fromarray(grey)))), np.dstack([grey] * 3))


def test_exif_orientation_is_applied() -> None:
    source = Image.fromarray(noise(40, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encoded(source, "JPEG", quality=95, exif=exif.tobytes())
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (40, 24) and stored.getexif()[0x0112] == 6
    expected = ImageOps.exif_transpose(stored).convert("RGB")
    image = image_of(data)
    assert image.size == (24, 40)
    assert np.array_equal(np.asarray(image), np.asarray(expected))
    # the mask painted on the displayed image turns the same way
    assert mask_of(data, "a1111").size == (24, 40)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_an_animation_gives_its_first_frame(fmt) -> None:
    frames = [Image.new("RGB", (16, 12), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0,
                   **options)
    animation = Image.open(io.BytesIO(data))
    assert animation.is_animated and animation.n_frames == 3
    image = image_of(data)
    assert image.size == (16, 12)
    assert set(image.getdata()) == {(255, 0, 0)}


# -- masks ---------------------------------------------------------------------------------

def test_a1111_masks_white_repaints_grey_levels_kept() -> None:
    grey = noise(30, 20, 1)
    mask = mask_of(b64(encoded(Image.fromarray(grey))), "a1111")
    assert mask.mode == "L" and mask.size == (30, 20)
    assert np.array_equal(np.asarray(mask), grey)
    rgb = noise(30, 20)
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    got = np.asarray(mask_of(encoded(Image.fromarray(rgb)), "a1111")).astype(float)
    assert np.abs(got - luma).max() <= 1


def test_a1111_masks_with_transparency_are_read_from_their_alpha() -> None:
    rgb, alpha = noise(20, 10), noise(20, 10, 1)
    alpha[0, :4] = [128, 129, 0, 255]
    mask = np.asarray(mask_of(encoded(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), "a1111"))
    assert np.array_equal(mask, np.where(alpha > 128, 255, 0))
    assert list(mask[0, :4]) == [0, 255, 0, 255]
    # fully opaque alpha: the colours are the mask (A1111 reads such a mask as grey)
    opaque = np.full_like(alpha, 255)
    luma = rgb.astype(float) @ np.array([0.299, 0.587, 0.114])
    got = np.asarray(mask_of(encoded(Image.fromarray(np.dstack([rgb, opaque]), "RGBA")), "a1111"))
    assert np.abs(got.astype(float) - luma).max() <= 1


def test_openai_masks_edit_where_fully_transparent() -> None:
    rgb, alpha = noise(16, 16), noise(16, 16, 1)
    alpha[0, :3] = [0, 1, 255]
    mask = mask_of(encoded(Image.fromarray(np.dstack([rgb, alpha]), "RGBA")), "openai")
    assert mask.mode == "L" and mask.size == (16, 16)
    assert np.array_equal(np.asarray(mask), np.where(alpha == 0, 255, 0))
    la = mask_of(encoded(Image.fromarray(np.dstack([noise(16, 16, 1), alpha]), "LA")), "openai")
    assert np.array_equal(np.asarray(la), np.where(alpha == 0, 255, 0))
    indices = RNG.integers(0, 2, size=(8, 8), dtype=np.uint8)
    palette = Image.fromarray(indices, "P")
    palette.putpalette([0, 0, 0, 255, 255, 255])
    pal = mask_of(encoded(palette, transparency=0), "openai")
    assert np.array_equal(np.asarray(pal), np.where(indices == 0, 255, 0))


def test_an_openai_mask_without_alpha_is_refused_naming_mask() -> None:
    for image in (Image.fromarray(noise(8, 8)), Image.fromarray(noise(8, 8, 1))):
        error = refused(encoded(image), mask="openai", field="mask")
        assert error.message.startswith("This server doesn't have mask '<")
        assert "an OpenAI mask needs an alpha channel" in error.message


def test_an_unknown_mask_convention_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown mask convention"):
        mask_of(encoded(Image.fromarray(noise(8, 8))), "comfy")


def test_decoding_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: dict[str, int] = {}
    for name in ("decode_base64", "decode_image", "decode_mask"):
        real = getattr(image_inputs, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            threads[_name] = threading.get_ident()
            return _real(*args, **kwargs)

        monkeypatch.setattr(image_inputs, name, spy)
    data = b64(encoded(Image.fromarray(np.dstack([noise(8, 8), noise(8, 8, 1)]), "RGBA")))

    async def main() -> int:
        await read_image("image", data, settings())
        await read_mask("mask", data, settings(), convention="openai")
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert set(threads) == {"decode_base64", "decode_image", "decode_mask"}
    assert loop_thread not in threads.values()


# -- URLs ----------------------------------------------------------------------------------

PICTURE = noise(12, 10)
PICTURE_PNG = encoded(Image.fromarray(PICTURE))


class _Remote(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.paths: list[str] = []
        self.streamed = 0
        self.stream_done = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Remote

    def log_message(self, *args) -> None:  # quiet
        pass

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self._head(200, {"Content-Type": "image/png", "Content-Length": str(len(PICTURE_PNG))})
            self.wfile.write(PICTURE_PNG)
        elif self.path == "/endless":  # no length: read until the cap
            self._head(200, {"Content-Type": "image/png"})
            try:
                for _ in range(1024):  # 64 MiB at most
                    self.wfile.write(b"\x00" * 65536)
                    self.server.streamed += 65536
            except OSError:
                pass
            finally:
                self.server.stream_done.set()
        elif self.path == "/announced":
            self._head(200, {"Content-Type": "image/png", "Content-Length": str(10 * 2**20)})
            self.wfile.write(b"\x00" * 1024)
        elif self.path == "/slow":
            self._head(200, {"Content-Type": "image/png", "Content-Length": str(len(PICTURE_PNG))})
            self.wfile.write(PICTURE_PNG[:20])
            self.wfile.flush()
            time.sleep(3)
            self.wfile.write(PICTURE_PNG[20:])
        elif self.path == "/to-loopback":
            self._head(302, {"Location": f"http://127.0.0.1:{port}/img.png", "Content-Length": "0"})
        elif self.path == "/to-relative":
            self._head(301, {"Location": "/img.png", "Content-Length": "0"})
        elif self.path == "/to-file":
            self._head(302, {"Location": "file:///etc/passwd", "Content-Length": "0"})
        elif self.path.startswith("/loop"):
            self._head(307, {"Location": self.path + "x", "Content-Length": "0"})
        else:
            self._head(404, {"Content-Length": "0"})


@pytest.fixture(scope="module")
def remote() -> Iterator[_Remote]:
    server = _Remote()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


LISTED = {"allow_image_urls": True, "image_url_private_hosts": ["127.0.0.1"]}


def test_urls_are_not_fetched_by_default(remote) -> None:
    before = len(remote.paths)
    error = refused(remote.base + "/img.png")
    assert ("image URLs are not fetched by this server (setting CRAFTSERVE_ALLOW_IMAGE_URLS is off)"
            in error.message)
    assert remote.base in error.message  # the URL is quoted (it is no image data)
    assert len(remote.paths) == before  # nothing asked


def test_a_loopback_host_is_refused_unless_listed(remote) -> None:
    before = len(remote.paths)
    for url in (remote.base + "/img.png", remote.base.replace("127.0.0.1", "localhost") + "/img.png"):
        error = refused(url, allow_image_urls=True)
        assert "loopback address; image URLs reach such addresses only for hosts named in the setting " \
               "CRAFTSERVE_IMAGE_URL_PRIVATE_HOSTS" in error.message
    assert len(remote.paths) == before


@pytest.mark.parametrize("listed", [["127.0.0.1"], ["127.0.0.0/8"], ["localhost"]])
def test_a_listed_private_host_is_served(remote, listed) -> None:
    base = remote.base.replace("127.0.0.1", "localhost") if listed == ["localhost"] else remote.base
    image = image_of(base + "/img.png", allow_image_urls=True, image_url_private_hosts=listed)
    assert np.array_equal(np.asarray(image), PICTURE)
    mask = mask_of(base + "/img.png", "a1111", allow_image_urls=True, image_url_private_hosts=listed)
    assert mask.size == (12, 10)


def test_the_host_allow_list(remote) -> None:
    error = refused(remote.base + "/img.png", **LISTED, image_url_hosts=["images.example.com"])
    assert "the host '127.0.0.1' is not one image URLs may name (setting CRAFTSERVE_IMAGE_URL_HOSTS)" \
        in error.message
    image = image_of(remote.base + "/img.png", **LISTED, image_url_hosts=["images.example.com", "127.0.0.1"])
    assert np.array_equal(np.asarray(image), PICTURE)


def test_a_body_past_the_byte_cap_is_refused_while_it_streams(remote) -> None:
    remote.stream_done.clear()
    remote.streamed = 0
    error = refused(remote.base + "/endless", **LISTED, max_image_bytes=65536, image_url_timeout_s=30)
    assert "it passed 65536 bytes while arriving; at most 65536 bytes" in error.message
    assert "(setting CRAFTSERVE_MAX_IMAGE_BYTES)" in error.message
    assert remote.stream_done.wait(10)
    assert remote.streamed < 32 * 2**20  # the server stopped early: the connection was closed


def test_a_body_announced_past_the_byte_cap_is_refused_unread(remote) -> None:
    error = refused(remote.base + "/announced", **LISTED, max_image_bytes=65536)
    assert f"it announces {10 * 2**20} bytes; at most 65536 bytes" in error.message


def test_a_slow_url_is_refused_by_the_time_cap(remote) -> None:
    started = time.monotonic()
    error = refused(remote.base + "/slow", **LISTED, image_url_timeout_s=0.5)
    assert time.monotonic() - started < 2.5
    assert "the image did not arrive within 0.5 s (setting CRAFTSERVE_IMAGE_URL_TIMEOUT_S)" in error.message


def test_redirects_are_checked_like_the_first_url(remote) -> None:
    named = remote.base.replace("127.0.0.1", "localhost")
    only_the_name = {"allow_image_urls": True, "image_url_private_hosts": ["localhost"]}
    before = list(remote.paths)
    error = refused(named + "/to-loopback", **only_the_name)
    assert "the host '127.0.0.1' resolves to 127.0.0.1, a loopback address" in error.message
    assert remote.paths[len(before):] == ["/to-loopback"]  # the target never asked
    relative = image_of(named + "/to-relative", **only_the_name)
    assert np.array_equal(np.asarray(relative), PICTURE)
    assert "a redirect to file:///etc/passwd: only http and https URLs are fetched" in refused(
        remote.base + "/to-file", **LISTED).message
    assert "the URL redirected more than 3 times" in refused(remote.base + "/loop", **LISTED).message
    assert remote.paths[-4:] == ["/loop", "/loopx", "/loopxx", "/loopxxx"]


def test_an_error_answer_is_refused(remote) -> None:
    assert "the URL answered HTTP 404, not the image" in refused(remote.base + "/missing", **LISTED).message


def test_a_host_that_does_not_resolve(remote) -> None:
    error = refused("http://no-such-host.invalid/a.png", allow_image_urls=True)
    assert "the host 'no-such-host.invalid' does not resolve" in error.message


def _certificate(folder, name: str) -> tuple[str, str]:
    """A self-signed certificate for the DNS name `name` only (no IP address in it), and its key."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


@pytest.mark.parametrize("certified", ["localhost", "other.example"])
def test_https_keeps_the_name_for_sni_and_the_certificate(tmp_path, monkeypatch, certified) -> None:
    """The connection goes to the checked address (127.0.0.1), yet TLS sends the URL's name
    (SNI) and checks the certificate against it: a certificate for the name only is accepted,
    one for another name refused."""
    pytest.importorskip("cryptography")
    import ssl

    import httpx

    cert_file, key_file = _certificate(tmp_path, certified)
    server = _Remote()
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert_file, key_file)
    names: list = []
    served.sni_callback = lambda _sock, name, _context: names.append(name)
    server.socket = served.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    trusted = ssl.create_default_context(cafile=cert_file)

    class TrustingClient(httpx.AsyncClient):  # the test's own CA, else as the server makes it
        def __init__(self, **options) -> None:
            super().__init__(verify=trusted, **options)

    monkeypatch.setattr(httpx, "AsyncClient", TrustingClient)
    url = f"https://localhost:{server.server_address[1]}/img.png"
    try:
        if certified == "localhost":
            image = image_of(url, allow_image_urls=True, image_url_private_hosts=["localhost"])
            assert np.array_equal(np.asarray(image), PICTURE)
            assert "localhost" in names
        else:
            error = refused(url, allow_image_urls=True, image_url_private_hosts=["localhost"])
            assert "could not be fetched: no address of its host took the connection" in error.message
            assert "CERTIFICATE_VERIFY_FAILED" in error.message
            assert server.paths == []
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("address", "kind"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
    ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fc00::1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "reserved"),
    ("100.64.0.1", "non-global"),  # carrier-grade NAT
    ("8.8.8.8", None), ("2606:4700:4700::1111", None),
])
def test_which_addresses_are_public(address, kind) -> None:
    assert non_public_kind(ipaddress.ip_address(address)) == kind


def test_url_settings_are_checked_at_start() -> None:
    parsed = settings(image_url_hosts="Images.Example.com, *.cdn.example",
                      image_url_private_hosts="10.0.0.0/8,[::1]")
    assert parsed.image_url_hosts == ["images.example.com", "*.cdn.example"]
    assert parsed.image_url_private_hosts == ["10.0.0.0/8", "::1"]
    with pytest.raises(ValueError, match="is not a host name, address or network"):
        settings(image_url_hosts="https://images.example.com")
    with pytest.raises(ValueError):
        settings(max_image_pixels=8192 * 8192 + 1)  # past Pillow's own bomb limit's reach


# -- the body cap of the image routes ------------------------------------------------------

def test_the_image_body_cap_holds_an_image_and_its_mask_at_the_byte_cap() -> None:
    default = settings()
    image = "data:image/png;base64," + b64(b"\xff" * default.max_image_bytes)
    body = json.dumps({"init_images": [image], "mask": image, "prompt": "p" * default.max_prompt_length,
                       "negative_prompt": "n" * default.max_prompt_length}).encode()
    assert len(body) <= image_body_cap(default)
    wrapped = base64.encodebytes(b"\xff" * default.max_image_bytes)  # 76-character lines
    assert 4 * len(wrapped) + default.max_body_bytes <= image_body_cap(default)
    assert image_body_cap(default) < 100 * 2**20
    assert image_body_cap(settings(max_image_body_bytes=5 * 2**20)) == 5 * 2**20


TINY_LAZY = """
models:
  tiny-sdxl:
    source: builtin:tiny-sdxl
"""


def test_the_edge_admits_image_bodies_on_image_routes_only(make_server) -> None:
    server = make_server(TINY_LAZY, wait_ready=False, max_image_body_bytes=4 * 2**20)
    big = json.dumps({"prompt": "x" * 3 * 2**20, "model": "tiny-sdxl"}).encode()
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + server_key(server)}
    with server.client() as client:
        passed = client.post("/jobs", content=big, headers=headers)
        assert passed.status_code == 422, passed.text  # read and parsed: the prompt is too long
        assert "prompt" in passed.text
        kept = client.post("/sd", content=big, headers=headers)
        assert kept.status_code == 413
        assert kept.json()["detail"].endswith("(setting CRAFTSERVE_MAX_BODY_BYTES)")
        over = json.dumps({"prompt": "x" * 5 * 2**20}).encode()
        refused_body = client.post("/jobs", content=over, headers=headers)
        assert refused_body.status_code == 413
        assert refused_body.json()["detail"].endswith("(setting CRAFTSERVE_MAX_IMAGE_BODY_BYTES)")
        # the text-to-image routes and detect carry ControlNet units' pictures
        for path, body, status in [
                ("/sdapi/v1/txt2img", {"prompt": "x" * 3 * 2**20}, 422),
                ("/v1/images/generations", {"prompt": "x" * 3 * 2**20, "model": "tiny-sdxl"}, 400),
                ("/controlnet/detect", {"controlnet_module": "canny",
                                        "controlnet_input_images": ["x" * 3 * 2**20]}, 422)]:
            answer = client.post(path, content=json.dumps(body).encode(), headers=headers)
            assert answer.status_code == status, (path, answer.status_code, answer.text[:200])


def server_key(server) -> str:
    return server.ready_headers["Authorization"].removeprefix("Bearer ")
