"""Images clients send, turned into checked PIL images: the one door every route that takes
an image (img2img, inpainting, upscaling, OpenAI edits, the job API) goes through.

What a client may send as an image:
- base64 text, with or without a `data:<type>;base64,` prefix; whitespace and line breaks
  inside, the URL-safe alphabet (`-`, `_`) and missing `=` padding are tolerated;
- raw bytes (a multipart upload);
- an `http(s)://` URL, fetched only where the settings allow it (`fetch_image_url`).

What comes back:
- `read_image`: an "RGB" image, EXIF orientation applied, the first frame of an animation.
  Every mode is converted: palette, greyscale, 1-bit, CMYK, YCbCr; 16-bit images keep
  their high byte (the value >> 8, as Pillow reads 16-bit RGB PNGs); 32-bit integer images
  are read as 16-bit values (clipped to 0..65535); float images as 0..1 when their largest
  value is at most 1, else as 0..255 (clipped). Transparency (an alpha channel, a palette's
  or a colour's tRNS) is composited on white: A1111 fills the transparent parts of init
  images with its option `img2img_background_color`, white by default (`images.flatten`);
  a plain `.convert("RGB")` would instead show whatever colour the transparent pixels
  happen to hold, often black.
- `read_mask`: an "L" image at the mask's own size, 255 = repaint, 0 = keep (what to do
  with another size is the route's business). Conventions:
  - "a1111": white repaints. A mask with transparency whose alpha is not fully opaque is
    read from its alpha, alpha > 128 → 255 else 0 (A1111's `create_binary_mask`, which does
    this for RGBA; here any alpha, LA and palette transparency too). Otherwise its
    luminance, grey levels kept (A1111's `convert("L")`).
  - "openai": the fully transparent pixels (alpha 0) are the area to edit (255), every
    other pixel 0. OpenAI documents the mask as a PNG with an alpha channel; one without
    transparency is refused, naming the field.

What is refused, as InvalidParameter (422; OpenAI's dialect answers it 400) naming the field:
empty values, text that is not base64, bytes that are not an image in a format read here
(PNG, JPEG, WebP, GIF, BMP, TIFF, AVIF), a truncated or damaged image, more bytes than
CRAFTSERVE_MAX_IMAGE_BYTES, more pixels than CRAFTSERVE_MAX_IMAGE_PIXELS (checked against
the size the header declares, before any pixel is decoded: decompression bombs), URLs of
other schemes, and URLs the URL settings do not let through. The value is echoed only as a
short prefix and its length, never as image data.

Decoding (base64 and pixels) runs on one decoding thread (`off_loop`): a 16 MiB PNG
takes long enough to stall every other request if it ran on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import ipaddress
import logging
import math
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

import httpx
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from app import __version__
from app.config import Settings
from app.errors import InvalidParameter

logger = logging.getLogger(__name__)

MaskConvention = Literal["a1111", "openai"]

# Formats read (Pillow's names; JPEG covers the MPO files cameras write). Others Pillow
# knows are left out on purpose: EPS runs Ghostscript, and the rest (PSD, ICO, TGA, FITS,
# ...) are attack surface no client of these APIs needs. AVIF where this Pillow reads it.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF") + (("AVIF",) if features.check("avif") else ())
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP, TIFF" + (", AVIF" if "AVIF" in FORMATS else "")
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})

IMAGES_PER_BODY = 4  # images at the byte cap that the default body cap of the image routes holds
MAX_REDIRECTS = 3
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")  # base64 never holds ':'
_URLSAFE = str.maketrans("-_", "+/")
_SHOWN_PREFIX = 16  # characters of base64 an error message quotes


# -- sizes ---------------------------------------------------------------------------------

def base64_chars(size: int) -> int:
    """Characters of the base64 text of `size` bytes, with line breaks (CRLF every 76
    characters, MIME's wrapping) and room for a data: URL's prefix."""
    chars = 4 * math.ceil(size / 3)
    return chars + 2 * math.ceil(chars / 76) + 64


def image_body_cap(settings: Settings) -> int:
    """The body cap of the routes that take images (app.api.edge.IMAGE_ROUTES):
    CRAFTSERVE_MAX_IMAGE_BODY_BYTES, or room for IMAGES_PER_BODY images at the byte cap as
    base64 on top of CRAFTSERVE_MAX_BODY_BYTES."""
    if settings.max_image_body_bytes is not None:
        return settings.max_image_body_bytes
    return settings.max_body_bytes + IMAGES_PER_BODY * base64_chars(settings.max_image_bytes)


def _mib(size: int) -> str:
    return f"{size} bytes ({size / 2**20:.3g} MiB)"


def _bytes_rule(settings: Settings) -> str:
    return (f"at most {_mib(settings.max_image_bytes)} are accepted per image "
            "(setting CRAFTSERVE_MAX_IMAGE_BYTES)")


def _quoted(value: str | bytes) -> str:
    """The value as an error message quotes it: never the image data itself."""
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if len(value) <= _SHOWN_PREFIX + 8:
        return value
    return f"{value[:_SHOWN_PREFIX]}... ({len(value)} characters)"


# -- text to bytes -------------------------------------------------------------------------

def decode_base64(field: str, text: str, settings: Settings) -> bytes:
    """The bytes of base64 text (a data: URL's too), leniently: whitespace, the URL-safe
    alphabet and missing padding are accepted. Text too long for the byte cap is refused
    before it is decoded."""
    shown = _quoted(text)
    stripped = text.strip()
    if not stripped:
        raise InvalidParameter(field, shown, "it is empty: send the image as base64 text (a "
                               "data:image/...;base64, URL too) or upload its file")
    scheme = _SCHEME.match(stripped)
    if scheme is not None:
        if scheme.group(1).lower() != "data":
            raise InvalidParameter(field, shown, _scheme_rule(scheme.group(1)))
        stripped = _data_url_payload(field, shown, stripped)
    if len(stripped) > base64_chars(settings.max_image_bytes):
        raise InvalidParameter(field, shown, f"its base64 text is {len(stripped)} characters, more "
                               f"than an image can take: {_bytes_rule(settings)}")
    data = _plain_base64(stripped)
    if data is not None:
        return data
    payload = "".join(stripped.split()).translate(_URLSAFE).rstrip("=")
    if len(payload) % 4 == 1:  # no base64 text has this length, padded or not
        raise InvalidParameter(field, shown, _NOT_BASE64)
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):  # ValueError: characters outside ASCII
        raise InvalidParameter(field, shown, _NOT_BASE64) from None
    if not data:
        raise InvalidParameter(field, shown, "it holds no bytes: send the image as base64 text")
    return data


# One thread decodes what clients send (base64, pixels, JSON bodies of the image routes,
# pictures prepared for a job), one thing at a time: several decoding threads would take turns
# on the GIL with the event loop's thread and hold it up for the sum of their pieces; one
# thread gives it back after each piece (a megabyte of base64, a PNG's rows, which Pillow
# decodes without the GIL). Pictures of several requests wait for each other here, milliseconds
# each, rather than the event loop waiting for all of them.
T = TypeVar("T")
_DECODER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="craftserve-decode")


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the decoding thread, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_DECODER, functools.partial(function, *args))


# ControlNet preprocessing (the detectors, some of them networks that take a second or more on a
# CPU) has its own thread, so a unit's preprocessing never holds up the decoding of other
# requests' pictures.
_PREPROCESSOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="craftserve-preprocess")


async def off_loop_preprocessing(function: Callable[..., T], *args: Any) -> T:
    """`function(*args)` on the preprocessing thread, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(_PREPROCESSOR, functools.partial(function, *args))


_CHUNK = 1 << 20  # base64 characters decoded at a time (a multiple of 4)


def _plain_base64(text: str) -> bytes | None:
    """Standard, padded base64 without whitespace (what clients send) decoded a megabyte at a
    time, letting go of the GIL between pieces: this runs in a worker thread, and one long
    decode would hold up the event loop's thread for its whole length. None when the text is
    not that (the lenient path then reads it, or refuses it)."""
    if len(text) % 4 or not text.isascii():
        return None
    raw = text.encode("ascii")
    parts = []
    try:
        for start in range(0, len(raw), _CHUNK):
            parts.append(binascii.a2b_base64(raw[start:start + _CHUNK], strict_mode=True))
            time.sleep(0)  # the GIL goes to the event loop's thread if it is waiting
    except binascii.Error:
        return None
    return b"".join(parts) or None


_NOT_BASE64 = ("it is not base64 text nor an http(s) URL: send the image's bytes as base64, with or "
               "without a data:image/...;base64, prefix")


def _scheme_rule(scheme: str) -> str:
    return (f"URLs of the scheme {scheme!r} are not read: send the image as base64 text (a "
            "data:image/...;base64, URL too), or an http or https URL where the server fetches them")


def _data_url_payload(field: str, shown: str, url: str) -> str:
    header, comma, payload = url.partition(",")
    params = [p.strip().lower() for p in header[len("data:"):].split(";")]
    if not comma or "base64" not in params[1:]:
        raise InvalidParameter(field, shown, "a data: URL must hold base64 "
                               "(data:image/png;base64,...)")
    return payload


def is_url(value: str | bytes) -> bool:
    """Whether a value is an http(s) URL (to fetch) rather than image data."""
    return isinstance(value, str) and value.lstrip()[:8].lower().startswith(("http://", "https://"))


# -- bytes to image ------------------------------------------------------------------------

def _open(field: str, data: bytes, settings: Settings, shown: str) -> Image.Image:
    """The first frame of the image in `data`, loaded and EXIF-rotated, in whatever mode it
    has; refused when past the byte or pixel caps, before any pixel is decoded. `shown`: the
    value as error messages quote it (the client's base64 prefix, or the bytes' count)."""
    if not data:
        raise InvalidParameter(field, shown, "it is empty: send the image's bytes")
    if len(data) > settings.max_image_bytes:
        raise InvalidParameter(field, shown, f"it is {len(data)} bytes; {_bytes_rule(settings)}")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # the header only
    except Image.DecompressionBombError as exc:
        # Pillow's own limit (twice Image.MAX_IMAGE_PIXELS), left as it is for other code;
        # the settings keep our cap below it, so such an image is past ours too
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = int(found[1]) if found else None
        raise InvalidParameter(field, shown, _pixels_rule(settings, pixels=pixels)) from None
    except UnidentifiedImageError:
        raise InvalidParameter(field, shown, f"it is not an image in a format this server reads "
                               f"({_FORMAT_NAMES})") from None
    except Exception as exc:  # a header the parser chokes on: every error of it means this
        logger.debug("image header refused: %r", exc)
        raise InvalidParameter(field, shown, _DAMAGED) from None
    _check_pixels(field, shown, image.size, settings)
    try:
        image.load()  # the first frame; a truncated file fails here
    except Exception as exc:
        logger.debug("image data refused: %r", exc)
        raise InvalidParameter(field, shown, _DAMAGED) from None
    _check_pixels(field, shown, image.size, settings)
    try:
        return ImageOps.exif_transpose(image)
    except Exception as exc:  # damaged EXIF: the pixels are still good
        logger.debug("EXIF orientation ignored: %r", exc)
        return image


_DAMAGED = "the image cannot be decoded: it is truncated or damaged"


def _pixels_rule(settings: Settings, size: tuple[int, int] | None = None, *,
                 pixels: int | None = None) -> str:
    side = math.isqrt(settings.max_image_pixels)
    declared = (f"it is {size[0]}x{size[1]} pixels ({size[0] * size[1]})" if size
                else f"it declares {pixels} pixels" if pixels
                else "it declares more pixels than accepted")
    return (f"{declared}; at most {settings.max_image_pixels} pixels (e.g. {side}x{side}) are "
            "accepted per image (setting CRAFTSERVE_MAX_IMAGE_PIXELS)")


def _check_pixels(field: str, shown: str, size: tuple[int, int], settings: Settings) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InvalidParameter(field, shown, f"it is {width}x{height} pixels: an image has at least one")
    if width * height > settings.max_image_pixels:
        raise InvalidParameter(field, shown, _pixels_rule(settings, size))


def _eight_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale as 8-bit "L" (see the module's docstring);
    other modes as they are."""
    if image.mode not in _HIGH_DEPTH_MODES:
        return image
    values = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if float(np.nanmax(values, initial=0.0)) <= 1.0 else 1.0
        levels = np.clip(np.nan_to_num(values * scale), 0, 255).round()
    else:  # I;16*: 0..65535; I: 32-bit, read as 16-bit values
        levels = np.clip(values.astype(np.int64), 0, 65535) >> 8
    return Image.fromarray(levels.astype(np.uint8), "L")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in _ALPHA_MODES or "transparency" in image.info


def _converted(field: str, shown: str, image: Image.Image, mode: str) -> Image.Image:
    try:
        return image.convert(mode)
    except ValueError:
        try:
            return image.convert("RGB").convert(mode)
        except ValueError:
            raise InvalidParameter(field, shown, f"its colour mode {image.mode} is not read here: "
                                   "send it as RGB or greyscale") from None


def _to_rgb(field: str, shown: str, image: Image.Image) -> Image.Image:
    image = _eight_bit(image)
    if _has_alpha(image):  # composited on white, as A1111 flattens init images
        rgba = _converted(field, shown, image, "RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else _converted(field, shown, image, "RGB")


def decode_image(field: str, data: bytes, settings: Settings, *, shown: str | None = None) -> Image.Image:
    """An image's bytes as a checked "RGB" image (the module's docstring says what is
    converted and what refused). Synchronous: call it through `off_loop`. `shown`:
    how error messages quote the value (default: its count of bytes)."""
    shown = shown or _quoted(data)
    return _to_rgb(field, shown, _open(field, data, settings, shown))


def decode_mask(field: str, data: bytes, settings: Settings, *, convention: MaskConvention,
                shown: str | None = None) -> Image.Image:
    """A mask's bytes as an "L" image, 255 = repaint, 0 = keep, at its own size, read by the
    dialect's convention (the module's docstring). Synchronous, like `decode_image`."""
    if convention not in ("a1111", "openai"):
        raise ValueError(f"unknown mask convention {convention!r}")
    shown = shown or _quoted(data)
    image = _eight_bit(_open(field, data, settings, shown))
    if convention == "openai":
        if not _has_alpha(image):
            raise InvalidParameter(field, shown, f"an OpenAI mask needs an alpha channel: its fully "
                                   f"transparent pixels (alpha 0) mark the area to edit; this one is "
                                   f"{image.mode} without transparency (send a PNG with alpha)")
        alpha = _converted(field, shown, image, "RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a == 0 else 0)
    if _has_alpha(image):
        alpha = _converted(field, shown, image, "RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return alpha.point(lambda a: 255 if a > 128 else 0)
    return _converted(field, shown, image, "L")


# -- URLs ----------------------------------------------------------------------------------

async def fetch_image_url(field: str, url: str, settings: Settings) -> bytes:
    """The bytes at an http(s) URL, where the settings allow it (the module's docstring and
    Settings' comments): allowed hosts only, never a non-public address unless listed, at
    most MAX_REDIRECTS redirects each checked like the first, at most the byte cap (counted
    while the body streams) and all within the time cap."""
    url = url.strip()
    if not settings.allow_image_urls:
        raise InvalidParameter(field, url, "image URLs are not fetched by this server (setting "
                               "CRAFTSERVE_ALLOW_IMAGE_URLS is off): send the image itself as base64 "
                               "text or a file")
    timeout = settings.image_url_timeout_s
    try:
        return await asyncio.wait_for(_fetch(field, url, settings), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        raise InvalidParameter(field, url, f"the image did not arrive within {timeout:g} s (setting "
                               "CRAFTSERVE_IMAGE_URL_TIMEOUT_S)") from None


async def _fetch(field: str, url: str, settings: Settings) -> bytes:
    headers = {"User-Agent": f"craftserve/{__version__}", "Accept": "image/*",
               "Accept-Encoding": "identity"}  # a compressed body could expand past the count
    # trust_env=False: no proxy from the environment, which would reach what the checks refuse
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, headers=headers,
                                 timeout=settings.image_url_timeout_s) as client:
        current = url
        for _hop in range(MAX_REDIRECTS + 1):
            target = _checked_url(field, url, current, settings)
            addresses = await _public_addresses(field, url, target, settings)
            response = await _connect(field, url, client, target, addresses)
            try:
                if response.status_code in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise InvalidParameter(field, url, f"the URL answered HTTP "
                                               f"{response.status_code} without a Location")
                    # an absolute target as it came (so that a message quotes it as sent)
                    current = location if _SCHEME.match(location) else str(target.join(location))
                    continue
                if response.status_code != 200:
                    raise InvalidParameter(field, url, f"the URL answered HTTP {response.status_code}, "
                                           "not the image")
                return await _read_capped(field, url, response, settings)
            except httpx.TimeoutException:
                raise
            except httpx.HTTPError as exc:
                raise InvalidParameter(field, url, f"the image could not be fetched "
                                       f"({type(exc).__name__})") from None
            finally:
                await response.aclose()
        raise InvalidParameter(field, url, f"the URL redirected more than {MAX_REDIRECTS} times")


def _checked_url(field: str, url: str, current: str, settings: Settings) -> httpx.URL:
    """`current` (the URL or a redirect's target) parsed, its scheme and host checked."""
    scheme = _SCHEME.match(current)
    if scheme is None or scheme.group(1).lower() not in ("http", "https"):
        what = "the URL" if current == url else f"a redirect to {_shown_url(current)}"
        raise InvalidParameter(field, url, f"{what}: only http and https URLs are fetched")
    try:
        target = httpx.URL(current)
    except (httpx.InvalidURL, ValueError):
        raise InvalidParameter(field, url, f"{_shown_url(current)} is not a valid URL") from None
    host = target.host.lower()
    if not host:
        raise InvalidParameter(field, url, "the URL names no host")
    if settings.image_url_hosts and not _host_listed(host, target.raw_host, settings.image_url_hosts):
        raise InvalidParameter(field, url, f"the host {host!r} is not one image URLs may name "
                               "(setting CRAFTSERVE_IMAGE_URL_HOSTS)")
    return target


def _shown_url(url: str) -> str:
    return url if len(url) <= 80 else url[:80] + "..."


def _host_listed(host: str, raw_host: bytes, patterns: list[str]) -> bool:
    names = {host, raw_host.decode("ascii", "replace").lower()}
    for pattern in patterns:
        if pattern == "*" or pattern in names:
            return True
        if pattern.startswith("*.") and any(n.endswith(pattern[1:]) for n in names):
            return True
    return False


def non_public_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes an address one image URLs may not reach unless listed ("loopback",
    "private", ...), or None for a public (global unicast) address. IPv4 addresses inside
    IPv6 ones (mapped, 6to4) are judged as themselves."""
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour
        if inner is not None:
            return non_public_kind(inner)
    for kind in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if address.is_global else "non-global"


def _private_allowed(host: str, raw_host: bytes, address: ipaddress.IPv4Address | ipaddress.IPv6Address,
                     listed: list[str]) -> bool:
    for entry in listed:
        try:
            if address in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:  # a name
            if _host_listed(host, raw_host, [entry]):
                return True
    return False


async def _public_addresses(field: str, url: str, target: httpx.URL, settings: Settings) -> list[str]:
    """Every address the host resolves to, each checked (a name with one public and one
    private address is refused: the connection could go to either)."""
    host = target.host.lower()
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            target.raw_host.decode("ascii"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise InvalidParameter(field, url, f"the host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for text in addresses:
        address = ipaddress.ip_address(text.partition("%")[0])  # fe80::1%eth0: a scoped address
        kind = non_public_kind(address)
        if kind and not _private_allowed(host, target.raw_host, address, settings.image_url_private_hosts):
            raise InvalidParameter(field, url, f"the host {host!r} resolves to {text}, a {kind} "
                                   "address; image URLs reach such addresses only for hosts named "
                                   "in the setting CRAFTSERVE_IMAGE_URL_PRIVATE_HOSTS")
    if not addresses:
        raise InvalidParameter(field, url, f"the host {host!r} does not resolve")
    return addresses


async def _connect(field: str, url: str, client: httpx.AsyncClient, target: httpx.URL,
                   addresses: list[str]) -> httpx.Response:
    """The response head from the first of `addresses` that connects. The connection goes to
    the checked address itself, not to the name resolved again (which could then answer
    another address: DNS rebinding); Host and TLS (SNI, certificate) keep the name."""
    extensions = {"sni_hostname": target.raw_host.decode("ascii")} if target.scheme == "https" else {}
    failure = ""
    for address in addresses:
        request = client.build_request("GET", target.copy_with(host=address.partition("%")[0]),
                                       headers={"Host": target.netloc.decode("ascii")},
                                       extensions=extensions)
        try:
            return await client.send(request, stream=True)
        except httpx.ConnectError as exc:  # refused, unreachable, or TLS (a certificate) failed
            failure = str(exc)[:160]
            continue
        except httpx.TimeoutException:
            raise
        except httpx.HTTPError as exc:
            raise InvalidParameter(field, url, f"the image could not be fetched "
                                   f"({type(exc).__name__})") from None
    raise InvalidParameter(field, url, f"the image could not be fetched: no address of its host "
                           f"took the connection ({failure or 'none'})")


async def _read_capped(field: str, url: str, response: httpx.Response, settings: Settings) -> bytes:
    cap = settings.max_image_bytes
    announced = response.headers.get("content-length", "")
    if announced.isdigit() and int(announced) > cap:
        raise InvalidParameter(field, url, f"it announces {announced} bytes; {_bytes_rule(settings)}")
    parts: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > cap:
            raise InvalidParameter(field, url, f"it passed {cap} bytes while arriving; "
                                   f"{_bytes_rule(settings)}")
        parts.append(chunk)
    return b"".join(parts)


# -- the doors -----------------------------------------------------------------------------

async def _image_bytes(field: str, value: str | bytes, settings: Settings) -> bytes | str:
    """Raw bytes, fetched bytes, or the text still to decode (in the worker thread)."""
    if isinstance(value, bytes):
        return value
    if is_url(value):
        return await fetch_image_url(field, value, settings)
    return value


def _decoded(field: str, value: str | bytes, source: bytes | str, settings: Settings) -> tuple[bytes, str]:
    """The bytes to decode and how messages quote what the client sent."""
    shown = value.strip() if is_url(value) else _quoted(value)  # a URL is quoted (short) as sent
    if isinstance(source, bytes):
        return source, shown
    return decode_base64(field, source, settings), shown


async def read_image(field: str, value: str | bytes, settings: Settings) -> Image.Image:
    """What a client sent as an image (base64 text, a data: URL, raw bytes or an http(s)
    URL) as a checked "RGB" image; InvalidParameter naming `field` when it is refused."""
    source = await _image_bytes(field, value, settings)

    def decode() -> Image.Image:
        data, shown = _decoded(field, value, source, settings)
        return decode_image(field, data, settings, shown=shown)

    return await off_loop(decode)


async def read_mask(field: str, value: str | bytes, settings: Settings, *,
                    convention: MaskConvention) -> Image.Image:
    """What a client sent as a mask, as an "L" image (255 = repaint) at its own size, read by
    the dialect's `convention` ("a1111" or "openai", the module's docstring)."""
    if convention not in ("a1111", "openai"):
        raise ValueError(f"unknown mask convention {convention!r}")
    source = await _image_bytes(field, value, settings)

    def decode() -> Image.Image:
        data, shown = _decoded(field, value, source, settings)
        return decode_mask(field, data, settings, convention=convention, shown=shown)

    return await off_loop(decode)
