"""A1111 prompt encoding (app.engine.prompts) on the tiny pipelines, against embeddings computed
by hand here: the text encoders called on token ids laid out as BOS + 75 + EOS chunks, the
weights multiplied in and the mean restored, chunks concatenated."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.engine.jobs import GenParams
from app.engine.prompts import PromptEncoder
from app.engine.tiny import build_tiny_sd15, build_tiny_sdxl
from app.engine.worker import _embeds
from app.samplers import resolve_sampler


@pytest.fixture(scope="module")
def sd15():
    return build_tiny_sd15()


@pytest.fixture(scope="module")
def sdxl():
    pipe = build_tiny_sdxl()
    # As the real SDXL tokenizer_2 (OpenCLIP-G): pads with "!", id 0.
    pipe.tokenizer_2.pad_token = "!"
    assert pipe.tokenizer_2.pad_token_id == 0
    return pipe


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def chunk_ids(tokenizer, content: list[int], pad: int | None = None) -> torch.Tensor:
    """BOS + content + EOS, filled to 77 with EOS (or, after the EOS, with `pad`)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert len(content) <= 75
    fill = [eos if pad is None else pad] * (75 - len(content))
    return torch.tensor([[bos, *content, eos, *fill]])


def emphasized(z: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """A1111's Original emphasis, by its definition: scale by weight, restore the mean."""
    full = [1.0, *weights, *[1.0] * (76 - len(weights))]
    before = z.mean()
    z = z * torch.tensor(full).reshape(1, 77, 1)
    return z * (before / z.mean())


def sd15_chunk(pipe, content: list[int], weights: list[float] | None = None, skip: int = 1,
               encoder=None) -> torch.Tensor:
    encoder = encoder or pipe.text_encoder
    with torch.no_grad():
        out = encoder(chunk_ids(pipe.tokenizer, content), output_hidden_states=True)
        z = out.last_hidden_state if skip == 1 else encoder.final_layer_norm(out.hidden_states[-skip])
    return emphasized(z, weights) if weights else z


def sdxl_chunk(pipe, content: list[int], weights: list[float] | None = None, encoders=None):
    """(hidden [1, 77, 64], pooled [1, 32]): both encoders' penultimate states, CLIP-L padded
    with EOS, OpenCLIP-G with 0."""
    first, second = encoders or (pipe.text_encoder, pipe.text_encoder_2)
    with torch.no_grad():
        out_l = first(chunk_ids(pipe.tokenizer, content), output_hidden_states=True)
        out_g = second(chunk_ids(pipe.tokenizer_2, content, pad=0), output_hidden_states=True)
    z_l, z_g = out_l.hidden_states[-2], out_g.hidden_states[-2]
    if weights:
        z_l, z_g = emphasized(z_l, weights), emphasized(z_g, weights)
    return torch.cat([z_l, z_g], dim=-1), out_g.text_embeds


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


# ---- SD 1.x --------------------------------------------------------------------------------
def test_sd15_weights_are_emphasis_with_the_mean_restored(sd15) -> None:
    tok = sd15.tokenizer
    a, cat, sat = ids_of(tok, "a"), ids_of(tok, "cat"), ids_of(tok, "sat")
    expected = sd15_chunk(sd15, a + cat + sat, [1.0] * len(a) + [1.5] * len(cat) + [1 / 1.1] * len(sat))
    close(PromptEncoder(sd15, "sd15").encode("a (cat:1.5) [sat]").hidden, expected)


def test_sd15_plain_prompt_is_the_pipelines_own_encoding_bit_for_bit(sd15) -> None:
    for text in ("a cat, on the mat", ""):
        with torch.no_grad():
            own, _ = sd15.encode_prompt(text, "cpu", 1, False)
        assert torch.equal(PromptEncoder(sd15, "sd15").encode(text).hidden, own)


def test_long_prompts_chunk_with_a1111s_comma_backtrack(sd15) -> None:
    tok = sd15.tokenizer
    x, y, comma = ids_of(tok, "x")[0], ids_of(tok, "y")[0], ids_of(tok, ",")[0]
    encoder = PromptEncoder(sd15, "sd15")
    # The comma 5 tokens before the end of a full chunk: what follows it moves on.
    text = " ".join(["x"] * 70) + ", " + " ".join(["y"] * 10)
    assert ids_of(tok, text) == [x] * 70 + [comma] + [y] * 10
    expected = torch.cat([sd15_chunk(sd15, [x] * 70 + [comma]), sd15_chunk(sd15, [y] * 10)], dim=1)
    close(encoder.encode(text).hidden, expected)
    # 35 tokens back is too far (more than 20): a plain cut at 75.
    text = " ".join(["x"] * 40) + ", " + " ".join(["y"] * 40)
    tokens = [x] * 40 + [comma] + [y] * 40
    expected = torch.cat([sd15_chunk(sd15, tokens[:75]), sd15_chunk(sd15, tokens[75:])], dim=1)
    close(encoder.encode(text).hidden, expected)
    # 75 tokens are one chunk, 76 two; BREAK closes a chunk.
    assert encoder.encode(" ".join(["x"] * 75)).chunks == 1
    close(encoder.encode(" ".join(["x"] * 76)).hidden,
          torch.cat([sd15_chunk(sd15, [x] * 75), sd15_chunk(sd15, [x])], dim=1))
    close(encoder.encode("x BREAK y").hidden,
          torch.cat([sd15_chunk(sd15, [x]), sd15_chunk(sd15, [y])], dim=1))


def test_shorter_text_is_padded_with_empty_chunks(sd15) -> None:
    encoder = PromptEncoder(sd15, "sd15")
    close(encoder.encode("", min_chunks=2).hidden,
          torch.cat([sd15_chunk(sd15, []), sd15_chunk(sd15, [])], dim=1))
    params = _params("sd15", prompt=" ".join(["x"] * 80), negative_prompt="")
    kwargs = _embeds(encoder, [params], 2, zero_negative=False)
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (1, 154, 32)


def test_sd15_clip_skip_is_the_nth_last_layer_then_the_final_norm(sd15) -> None:
    tok = sd15.tokenizer
    content = ids_of(tok, "a cat")
    encoder = PromptEncoder(sd15, "sd15")
    close(encoder.encode("a cat", clip_skip=2).hidden, sd15_chunk(sd15, content, skip=2))
    assert not torch.allclose(encoder.encode("a cat", clip_skip=2).hidden, encoder.encode("a cat").hidden)
    assert encoder.needs_encoding("a cat", 2, ()) and not encoder.needs_encoding("a cat", 1, ())
    # The tiny encoder has 2 layers (3 hidden states): deeper skips take the first one.
    close(encoder.encode("a cat", clip_skip=12).hidden, sd15_chunk(sd15, content, skip=3))


# ---- SDXL ----------------------------------------------------------------------------------
def test_sdxl_both_encoders_penultimate_padding_and_pooled_from_the_first_chunk(sdxl) -> None:
    tok = sdxl.tokenizer
    x = ids_of(tok, "x")
    encoder = PromptEncoder(sdxl, "sdxl")
    weighted = [1.0] * 74 + [1.21]
    text = " ".join(["x"] * 74) + " ((x)) " + " ".join(["x"] * 5)
    first, pooled = sdxl_chunk(sdxl, x * 75, weighted)
    second, _ = sdxl_chunk(sdxl, x * 5)
    encoded = encoder.encode(text)
    close(encoded.hidden, torch.cat([first, second], dim=1))
    close(encoded.pooled, pooled)


def test_sdxl_plain_prompt_is_the_pipelines_own_encoding_bit_for_bit(sdxl) -> None:
    for text in ("a cat, on the mat", "x"):
        with torch.no_grad():
            own, _, pooled, _ = sdxl.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        encoded = PromptEncoder(sdxl, "sdxl").encode(text)
        assert torch.equal(encoded.hidden, own) and torch.equal(encoded.pooled, pooled)


def test_sdxl_empty_negative_stays_zeros_for_the_pipeline(sdxl) -> None:
    params = _params("sdxl", prompt=" ".join(["x"] * 80), negative_prompt="")
    kwargs = _embeds(PromptEncoder(sdxl, "sdxl"), [params], 2, zero_negative=True)
    assert set(kwargs) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert kwargs["prompt_embeds"].shape == (1, 154, 64)


# ---- the same pixels as the string path for plain prompts ----------------------------------
def _params(family: str, **fields) -> GenParams:
    base = {"model": family, "prompt": "a cat", "negative_prompt": "", "sampler": resolve_sampler("Euler"),
            "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0, "loras": (), "seed": 5}
    base.update(fields)
    return GenParams(**base)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_plain_prompt_through_embeds_gives_the_same_pixels(family: str, negative: str) -> None:
    pipe = build_tiny_sd15() if family == "sd15" else build_tiny_sdxl()
    params = _params(family, prompt="a lighthouse, at dusk", negative_prompt=negative)
    common = {"num_inference_steps": 3, "guidance_scale": 7.0, "width": 64, "height": 64,
              "output_type": "np"}
    strings = pipe(prompt=[params.prompt], negative_prompt=[negative] if negative else None,
                   generator=[torch.Generator("cpu").manual_seed(5)], **common).images
    zero = family == "sdxl" and not negative
    embeds = _embeds(PromptEncoder(pipe, family), [params], 1, zero_negative=zero)
    ours = pipe(**embeds, generator=[torch.Generator("cpu").manual_seed(5)], **common).images
    assert (strings == ours).all()


# ---- textual inversion -------------------------------------------------------------------
def test_embedding_vectors_replace_the_name_tokens(sd15, sdxl, tmp_path: Path) -> None:
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    save_file({"emb_params": vectors}, tmp_path / "myemb.safetensors")
    tok = sd15.tokenizer
    # By hand: two unused token ids whose embedding rows are the vectors.
    edited = copy.deepcopy(sd15.text_encoder)
    with torch.no_grad():
        edited.get_input_embeddings().weight[1:3] = vectors
    content = ids_of(tok, "a photo of") + [1, 2]
    weights = [1.0] * len(ids_of(tok, "a photo of ")) + [1.1, 1.1]
    expected = sd15_chunk(sd15, content, weights, encoder=edited)
    embeddings = [("myemb", tmp_path / "myemb.safetensors")]
    encoder = PromptEncoder(sd15, "sd15")
    close(encoder.encode("a photo of (myemb)", embeddings=embeddings).hidden, expected)
    assert encoder.needs_encoding("a photo of myemb", 1, embeddings)

    l_vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
    g_vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    save_file({"clip_l": l_vectors, "clip_g": g_vectors}, tmp_path / "xlemb.safetensors")
    first, second = copy.deepcopy(sdxl.text_encoder), copy.deepcopy(sdxl.text_encoder_2)
    with torch.no_grad():
        first.get_input_embeddings().weight[1:4] = l_vectors
        second.get_input_embeddings().weight[1:4] = g_vectors
    hidden, pooled = sdxl_chunk(sdxl, [1, 2, 3] + ids_of(tok, ", x"),
                                encoders=(first, second))
    encoded = PromptEncoder(sdxl, "sdxl").encode(
        "xlemb, x", embeddings=[("xlemb", tmp_path / "xlemb.safetensors")])
    close(encoded.hidden, hidden)
    close(encoded.pooled, pooled)


def test_an_embedding_of_another_width_stays_plain_text(sd15, tmp_path: Path) -> None:
    save_file({"emb_params": torch.ones(2, 48)}, tmp_path / "sd2emb.safetensors")  # e.g. SD 2.x
    embeddings = [("sd2emb", tmp_path / "sd2emb.safetensors")]
    encoder = PromptEncoder(sd15, "sd15")
    assert not encoder.needs_encoding("a photo of sd2emb", 1, embeddings)
    assert torch.equal(encoder.encode("a photo of sd2emb", embeddings=embeddings).hidden,
                       encoder.encode("a photo of sd2emb").hidden)
