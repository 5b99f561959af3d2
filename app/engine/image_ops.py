"""What happens to a picture before and after an image-to-image pass, as AUTOMATIC1111 does it.

Pure PIL/numpy functions, no model: the HTTP side prepares each job's source (`prepare_source`,
run off the event loop) and the worker finishes each generated image (`finish`). Every rule
follows A1111's `modules/processing.py`, `modules/images.py` and `modules/masking.py` (read,
then written anew here):

- resize modes (`resize_image`): 0 just resize (Lanczos), 1 crop and resize (cover, centred
  crop), 2 resize and fill (fit, the bars filled by stretching the edge rows or columns),
  3 latent upscale (the picture is encoded at its own size and its latents resized; here the
  worker does that, the picture is only rounded to a multiple of 8);
- masks: white repaints; a mask whose alpha channel is not fully opaque is read from its alpha
  (binarised at 128, A1111's `create_binary_mask`); `inpainting_mask_invert`; `mask_blur` is a
  Gaussian of sigma = blur with a (2·int(2.5·blur + 0.5) + 1)-tap kernel, first across, then
  down (cv2's `GaussianBlur`, borders reflected without repeating the edge);
- masked content (`inpainting_fill`): 0 "fill" paints the masked area with ever less blurred
  colours of its surroundings, 1 "original" leaves it, 2 "latent noise" and 3 "latent nothing"
  get that fill too and then, in latent space (the worker), noise or zeros where the mask is;
- "only masked" (`inpaint_full_res`): the blurred mask's box plus `padding`, grown to the
  requested aspect ratio, is cut out and generated at the requested size; the result is scaled
  back into the box;
- the overlay: the generated picture is laid under the original, whose alpha is the blurred
  mask doubled (A1111 doubles it so the blur fades inside the masked area only), so pixels
  outside the blurred mask stay exactly the original's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter, ImageOps

RESIZE_MODES = {0: "Just resize", 1: "Crop and resize", 2: "Resize and fill",
                3: "Just resize (latent upscale)"}
FILL_MODES = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at (width, height) by A1111's resize mode (3 resizes as 0: the latent part is
    the worker's)."""
    if mode in (0, 3):
        return _resize(image, width, height)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == 1:  # cover, then crop the overflow evenly
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = _resize(image, src_w, src_h)
        out = Image.new(image.mode, (width, height))
        out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
        return out
    if mode != 2:
        raise ValueError(f"unknown resize mode {mode}")
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = _resize(image, src_w, src_h)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, (width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:  # bars above and below: the first and last rows stretched
        bar = height // 2 - src_h // 2
        if bar > 0:
            out.paste(resized.resize((width, bar), box=(0, 0, width, 0)), (0, 0))
            out.paste(resized.resize((width, bar), box=(0, resized.height, width, resized.height)),
                      (0, bar + src_h))
    elif ratio > src_ratio:  # bars left and right: the first and last columns stretched
        bar = width // 2 - src_w // 2
        if bar > 0:
            out.paste(resized.resize((bar, height), box=(0, 0, 0, height)), (0, 0))
            out.paste(resized.resize((bar, height), box=(resized.width, 0, resized.width, height)),
                      (bar + src_w, 0))
    return out


def binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's reading of a mask: an RGBA mask that is not fully opaque is its alpha, white
    above 128; anything else its grey levels (white repaints)."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda v: 255 if v > 128 else 0)
    return mask.convert("L")


def _gaussian_kernel(sigma: float) -> np.ndarray:
    size = 2 * int(2.5 * sigma + 0.5) + 1
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    kernel = np.exp(-(x * x) / (2 * sigma * sigma))
    return kernel / kernel.sum()


def _blur_axis(values: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    kernel = _gaussian_kernel(sigma)
    radius = len(kernel) // 2
    length = values.shape[axis]
    # reflect without repeating the edge (cv2's BORDER_REFLECT_101), folded while the kernel is
    # wider than the image
    index = np.arange(-radius, length + radius)
    period = max(1, 2 * (length - 1))
    index = np.abs(index) % period if length > 1 else np.zeros_like(index)
    index = np.where(index >= length, period - index, index)
    padded = np.take(values, index, axis=axis)
    out = np.zeros_like(values, dtype=np.float64)
    for tap, weight in enumerate(kernel):
        out += weight * np.take(padded, np.arange(tap, tap + length), axis=axis)
    return out


def blur_mask(mask: Image.Image, blur: float) -> Image.Image:
    """A1111's mask blur: across, then down, each a Gaussian of sigma `blur`; 0 leaves it."""
    if blur <= 0:
        return mask
    values = np.asarray(mask.convert("L"), dtype=np.float64)
    values = np.clip(np.rint(_blur_axis(values, blur, axis=1)), 0, 255)
    values = np.clip(np.rint(_blur_axis(values, blur, axis=0)), 0, 255)
    return Image.fromarray(values.astype(np.uint8), "L")


def crop_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """The box of the mask's non-zero pixels grown by `padding` (within the picture); None
    for an empty mask."""
    box = mask.getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    return (max(x1 - padding, 0), max(y1 - padding, 0),
            min(x2 + padding, mask.width), min(y2 + padding, mask.height))


def expand_region(region: tuple[int, int, int, int], width: int, height: int,
                  image_width: int, image_height: int) -> tuple[int, int, int, int]:
    """Grow `region` to the aspect ratio of width x height, as evenly as the picture allows."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > width / height:
        grow = int((x2 - x1) / (width / height) - (y2 - y1))
        y1 -= grow // 2
        y2 += grow - grow // 2
        if y2 >= image_height:
            y1 -= y2 - image_height
            y2 = image_height
        if y1 < 0:
            y2 -= y1
            y1 = 0
        y2 = min(y2, image_height)
    else:
        grow = int((y2 - y1) * (width / height) - (x2 - x1))
        x1 -= grow // 2
        x2 += grow - grow // 2
        if x2 >= image_width:
            x1 -= x2 - image_width
            x2 = image_width
        if x1 < 0:
            x2 -= x1
            x1 = 0
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the picture's colours around it, blurred
    less and less (radii 256, 64, 16, 4, 2, 0), each layer over the last."""
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    out = Image.new("RGBA", image.size)
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        layer = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(layer)
    return out.convert("RGB")


@dataclass(frozen=True, eq=False)
class Source:
    """One job's picture, ready for the worker (compared by identity: a job has its own).

    `image` is what the pass starts from, at the generation size (for resize mode 3 at its own
    size rounded down to a multiple of 8: the worker resizes its latents). `mask` (L, the same
    size, 255 = repaint) is the blurred mask the latents are blended through; None for plain
    img2img. `overlay` (RGBA, the original's size) and `paste` (x, y, w, h: where the
    generated crop goes back, "only masked") finish the image (`finish`)."""

    image: Image.Image
    mask: Image.Image | None = None
    overlay: Image.Image | None = None
    paste: tuple[int, int, int, int] | None = None
    latent_resize: bool = False  # resize mode 3


def prepare_source(image: Image.Image, width: int, height: int, *, mask: Image.Image | None = None,
                   resize_mode: int = 0, mask_blur: float = 4, fill_mode: int = 1,
                   full_res: bool = False, padding: int = 0, invert: bool = False) -> Source:
    """A1111's preparation of one init image (RGB) and its mask (any mode; `binary_mask`
    reads it) for a pass at width x height (multiples of 8)."""
    image = image.convert("RGB")
    if mask is None:
        if resize_mode == 3:
            w, h = max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)
            return Source(image=_resize(image, w, h), latent_resize=True)
        return Source(image=resize_image(resize_mode, image, width, height))
    pixel_mode = 0 if resize_mode == 3 else resize_mode  # with a mask, latents are not resized
    mask = binary_mask(mask)
    if invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, mask_blur)
    region = None
    if full_res:
        if mask.size != image.size:
            mask = resize_image(resize_mode, mask, image.width, image.height)
        region = crop_region(mask, padding)
        if region is not None:
            region = expand_region(region, width, height, mask.width, mask.height)
    if region is not None:
        overlay_mask = mask
        latent_mask = resize_image(2, mask.crop(region), width, height)
        base = image
    else:  # the whole picture (or "only masked" with an empty mask, as A1111 falls back)
        latent_mask = resize_image(resize_mode, mask, width, height)
        doubled = np.clip(np.asarray(latent_mask, np.float32) * 2, 0, 255)
        overlay_mask = Image.fromarray(doubled.astype(np.uint8))
        base = resize_image(pixel_mode, image, width, height)
    if overlay_mask.size != base.size:
        overlay_mask = resize_image(pixel_mode, overlay_mask, base.width, base.height)
    overlay = Image.new("RGBa", base.size)
    overlay.paste(base.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(overlay_mask.convert("L")))
    work = resize_image(2, base.crop(region), width, height) if region is not None else base
    if fill_mode != 1:
        work = fill(work, latent_mask)
    paste = (region[0], region[1], region[2] - region[0], region[3] - region[1]) if region else None
    return Source(image=work, mask=latent_mask.convert("L"), overlay=overlay.convert("RGBA"), paste=paste)


def finish(generated: Image.Image, source: Source | None) -> Image.Image:
    """The generated picture put back: scaled into the "only masked" box, then under the
    original through the blurred mask (A1111's `apply_overlay`). Plain img2img: unchanged."""
    if source is None or source.overlay is None:
        return generated
    if source.paste is not None:
        x, y, w, h = source.paste
        canvas = Image.new("RGBA", source.overlay.size)
        canvas.paste(resize_image(1, generated, w, h), (x, y))
        generated = canvas
    out = generated.convert("RGBA")
    out.alpha_composite(source.overlay)
    return out.convert("RGB")
