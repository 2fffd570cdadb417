"""Placeholder replacement at the input-embedding level, checked with the real CLIP vocabulary."""

import pytest
import torch

from adaface_core.errors import ConfigError, PlaceholderError
from adaface_core.injection import (SpecialTokens, SubjectSlot, chunk_input_embeds, inject_into_chunks, inject_prompt,
                                    mask_standalone_placeholders, splice_subject_embeds)
from adaface_core.tokenizer import load_clip_tokenizer, single_token_id
from adaface_core.weights import load_clip_text_folder
from comfy_standin import StandInClip


@pytest.fixture(scope="module")
def clip(tiny_models):
    tokenizer = load_clip_tokenizer(tiny_models.tokenizer)
    return StandInClip(tokenizer, load_clip_text_folder(tiny_models.sd15 / "text_encoder"))


def special(clip):
    return SpecialTokens.from_empty_chunk(clip.tokenize("")["l"][0])


def slot(clip, word, tokens, placeholder="z"):
    return SubjectSlot(placeholder, tuple(single_token_id(clip.tokenizer, placeholder)), tokens)


def word_embedding(clip, word):
    ids = single_token_id(clip.tokenizer, word)
    return clip.text_model.embeddings.token_embedding.weight[ids].detach()


@pytest.mark.parametrize("word_ids", [False, True])
def test_injecting_a_words_embedding_equals_the_prompt_with_that_word(clip, word_ids):
    tokens = clip.tokenize("a photo of z in the forest", return_word_ids=word_ids)
    injected = {"l": inject_into_chunks(tokens["l"], [slot(clip, "dog", word_embedding(clip, "dog"))], special(clip))}
    assert all(len(chunk) == 77 for chunk in injected["l"])
    expected = clip.encode_from_tokens(clip.tokenize("a photo of dog in the forest"))
    torch.testing.assert_close(clip.encode_from_tokens(injected), expected, atol=1e-5, rtol=1e-5)


def test_multi_token_subject_changes_only_positions_from_the_placeholder_on(clip):
    subject = torch.randn(16, clip.text_model.config.hidden_size) * 0.02
    plain = clip.encode_from_tokens(clip.tokenize("a photo of z"))
    injected = clip.encode_from_tokens({"l": inject_into_chunks(clip.tokenize("a photo of z")["l"], [slot(clip, "s", subject)], special(clip))})
    assert injected.shape == plain.shape == (1, 77, clip.text_model.config.hidden_size)
    # Causal text encoder: positions before the placeholder (start, a, photo, of) are unchanged.
    torch.testing.assert_close(injected[:, :4], plain[:, :4])
    assert not torch.allclose(injected[:, 4:20], plain[:, 4:20])


def test_weight_of_the_placeholder_carries_to_every_subject_token(clip):
    chunks = clip.tokenize("a photo of (z:1.3)")["l"]
    out = inject_into_chunks(chunks, [slot(clip, "s", torch.zeros(16, 64))], special(clip))
    assert [entry[1] for entry in out[0][4:20]] == [1.3] * 16
    assert out[0][20][1] == 1.0


def test_long_prompt_overflows_into_a_new_chunk_without_splitting_the_subject(clip):
    prompt = " ".join(["red"] * 70) + " z blue"
    chunks = clip.tokenize(prompt)["l"]
    assert len(chunks) == 1
    out = inject_into_chunks(chunks, [slot(clip, "s", torch.ones(16, 64))], special(clip))
    assert len(out) == 2 and all(len(c) == 77 for c in out)
    tensor_positions = [[i for i, e in enumerate(c) if isinstance(e[0], torch.Tensor)] for c in out]
    assert tensor_positions[0] == [] and tensor_positions[1] == list(range(1, 17))
    assert out[1][17][0] == single_token_id(clip.tokenizer, "blue")[0]


def comfy_chunk(clip, segments):
    """One chunk as ComfyUI's SD1 tokenizer writes it with word ids: a word id per weighted segment."""
    ends = special(clip)
    body = [(token, weight, word) for word, (text, weight) in enumerate(segments, start=1)
            for token in clip.tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert len(body) <= 75
    return [(ends.start, 1.0, 0), *body, (ends.end, 1.0, 0)] + [(ends.pad, 1.0, 0)] * (75 - len(body))


@pytest.mark.parametrize("tail, cut_at", [("blue eyes", 0), ("blue eyes and a long green coat on a rainy day", 1)])
def test_an_overflow_moves_a_short_word_whole_and_cuts_a_long_one_as_comfyui_does(clip, tail, cut_at):
    """ComfyUI moves a weighted segment of fewer than 8 tokens whole into the next chunk and cuts a longer one
    at the chunk's end; the repack after the subject lengthened the prompt does the same. Here 58 tokens and
    the 16 subject tokens leave one place in the first chunk."""
    chunks = [comfy_chunk(clip, [(" ".join(["red"] * 58) + " z", 1.0), (tail, 1.2)])]
    out = inject_into_chunks(chunks, [slot(clip, "s", torch.ones(16, 64))], special(clip))
    tail_ids = clip.tokenizer(tail, add_special_tokens=False)["input_ids"]
    assert len(out) == 2 and sum(isinstance(e[0], torch.Tensor) for e in out[0]) == 16
    assert [e[0] for e in out[0] if e[1] == 1.2] == tail_ids[:cut_at]
    assert [e[0] for e in out[1] if e[1] == 1.2] == tail_ids[cut_at:]


def test_two_placeholders_take_two_subjects(clip):
    a, b = torch.full((16, 64), 1.0), torch.full((16, 64), 2.0)
    chunks = clip.tokenize("z and y at the beach")["l"]
    out = inject_into_chunks(chunks, [slot(clip, "s", a, "z"), slot(clip, "s", b, "y")], special(clip))[0]
    assert torch.equal(out[1][0], a[0]) and torch.equal(out[16][0], a[15])
    assert out[17][0] == single_token_id(clip.tokenizer, "and")[0]
    assert torch.equal(out[18][0], b[0]) and torch.equal(out[33][0], b[15])


def test_missing_placeholder_is_a_clear_error_unless_appending(clip):
    chunks = clip.tokenize("a photo of a man")["l"]
    with pytest.raises(PlaceholderError, match="placeholder 'z'"):
        inject_into_chunks(chunks, [slot(clip, "s", torch.zeros(16, 64))], special(clip))
    out = inject_into_chunks(chunks, [slot(clip, "s", torch.zeros(16, 64))], special(clip), append_if_missing=True)
    assert isinstance(out[0][6][0], torch.Tensor) and out[0][22][0] == special(clip).end


def test_only_placeholders_standing_as_words_are_replaced(clip):
    """The end of 'schwarz' is the token of 'z', the start of 'y2k' that of 'y': only the real words go."""
    a, b = torch.full((16, 64), 1.0), torch.full((16, 64), 2.0)
    slots = [slot(clip, "s", a, "z"), slot(clip, "s", b, "y")]
    out = inject_prompt("Z, in a schwarz coat with y's y2k look", lambda t: clip.tokenize(t)["l"], slots, special(clip))
    subjects = [e[0] for e in out[0] if isinstance(e[0], torch.Tensor)]
    assert [float(t[0]) for t in subjects] == [1.0] * 16 + [2.0] * 16
    rest = [e[0] for e in out[0] if not isinstance(e[0], torch.Tensor)]
    assert rest == [e[0] for e in clip.tokenize(", in a schwarz coat with 's y2k look")["l"][0]][: len(rest)]


def test_the_mask_leaves_embedding_references_and_other_words_alone(clip):
    slots = [slot(clip, "s", torch.zeros(16, 64), "z")]
    assert mask_standalone_placeholders("embedding:z z (z:1.2) schwarz z_1 z-like", slots) == "embedding:z 0 (0:1.2) schwarz z_1 0-like"


def test_a_placeholder_just_after_an_embedding_is_found(clip):
    """ComfyUI ends an embedding name at a space or at the bracket closing its weighted segment, and reads its
    prefix case-sensitively: in each of these 'z' is a word of the prompt (it was taken for part of a name)."""
    slots = [slot(clip, "s", torch.zeros(16, 64), "z")]
    text = "(embedding:style:1.1),z smiling embedding:style(z:1.2) Embedding:z embedding:z"
    assert mask_standalone_placeholders(text, slots) == "(embedding:style:1.1),0 smiling embedding:style(0:1.2) Embedding:0 embedding:z"
    out = inject_prompt("(embedding:style:1.1),z smiling", lambda t: clip.tokenize(t)["l"], slots, special(clip))
    assert sum(isinstance(e[0], torch.Tensor) for e in out[0]) == 16


def test_text_after_a_typed_end_token_is_kept(clip):
    """CLIP's tokenizer reads a typed <|endoftext|> as the end token, and ComfyUI encodes the text after it."""
    subject = torch.zeros(16, 64)
    out = inject_prompt("a photo of z <|endoftext|> in the forest", lambda t: clip.tokenize(t)["l"],
                        [slot(clip, "s", subject, "z")], special(clip))
    plain = [e[0] for e in clip.tokenize("a photo of <|endoftext|> in the forest")["l"][0]]
    end = special(clip).end
    tail = plain[plain.index(end) : plain.index(end) + 4]  # the typed end token and 'in the forest'
    ids = [e[0] for e in out[0] if not isinstance(e[0], torch.Tensor)]
    assert ids[4 : 4 + len(tail)] == tail and len(tail) == 4


def test_a_tokenizer_the_mask_does_not_fit_falls_back_to_every_occurrence(clip, caplog):
    def spreading_digits(text):  # one digit becomes two tokens: the two tokenizations no longer line up
        return clip.tokenize(text.replace("0", "0 0"))["l"]

    out = inject_prompt("z in a schwarz coat", spreading_digits, [slot(clip, "s", torch.zeros(16, 64))], special(clip))
    assert sum(isinstance(e[0], torch.Tensor) for e in out[0]) == 32
    assert "could not tell whole-word placeholders" in caplog.text


def test_a_placeholder_cut_by_the_chunk_boundary_is_still_found(clip, caplog):
    """ComfyUI cuts a long stretch of prompt at exactly 75 tokens: here the two tokens of 'zwx' fall on both
    sides of the cut, and the prompt must still read as if a word stood in its place."""
    placeholder = "zwx"
    assert len(single_token_id(clip.tokenizer, placeholder)) == 2
    prompt = "red " * 74 + "zwx man"
    chunks = clip.tokenize(prompt)["l"]
    assert chunks[0][75][0] == single_token_id(clip.tokenizer, placeholder)[0]  # the cut goes through it
    dog = slot(clip, "s", word_embedding(clip, "dog"), placeholder)
    injected = inject_prompt(prompt, lambda t: clip.tokenize(t)["l"], [dog], special(clip))
    expected = clip.encode_from_tokens(clip.tokenize("red " * 74 + "dog man"))
    torch.testing.assert_close(clip.encode_from_tokens({"l": injected}), expected, atol=1e-5, rtol=1e-5)
    assert "could not tell whole-word placeholders" not in caplog.text


def test_chunks_without_placeholder_are_returned_untouched(clip):
    chunks = clip.tokenize(" ".join(["red"] * 80) + " z")["l"]
    out = inject_into_chunks(chunks, [slot(clip, "s", torch.zeros(16, 64))], special(clip))
    assert out[0] == chunks[0]


def test_batched_splice_matches_chunk_injection(clip):
    prompt_ids = torch.tensor([clip.tokenizer("a photo of z in the forest", padding="max_length", max_length=77)["input_ids"]] * 2)
    embeds = clip.text_model.token_embeds(prompt_ids)
    subject = torch.randn(2, 16, 64)
    placeholder = single_token_id(clip.tokenizer, "z")[0]
    spliced = splice_subject_embeds(prompt_ids, embeds, placeholder, subject)
    chunk = inject_into_chunks(clip.tokenize("a photo of z in the forest")["l"], [slot(clip, "s", subject[1])], special(clip))[0]
    torch.testing.assert_close(spliced[1], clip._chunk_embeds(chunk))
    subject.requires_grad_(True)
    splice_subject_embeds(prompt_ids, embeds, placeholder, subject).sum().backward()
    assert subject.grad is not None and torch.all(subject.grad == 1)


def test_a_plain_tokenizers_output_injects_like_comfyui_chunks(clip):
    """Scripts and diffusers users pass the tokenizer's output straight in and get input embeddings back."""
    encoding = clip.tokenizer("a photo of z hugging y", padding="max_length", max_length=77)
    dog, cat = word_embedding(clip, "dog"), word_embedding(clip, "cat")
    chunks = inject_into_chunks(encoding, [slot(clip, "s", dog, "z"), slot(clip, "s", cat, "y")],
                                SpecialTokens.from_tokenizer(clip.tokenizer))
    assert len(chunks) == 1 and len(chunks[0]) == 77
    table = clip.text_model.embeddings.token_embedding.weight
    injected = clip.text_model(token_embeds=chunk_input_embeds(chunks, table)).last_hidden_state
    expected_ids = clip.tokenizer("a photo of dog hugging cat", padding="max_length", max_length=77, return_tensors="pt")
    expected = clip.text_model(input_ids=expected_ids["input_ids"]).last_hidden_state
    torch.testing.assert_close(injected, expected, atol=1e-5, rtol=1e-5)
    # The same through a batch of id lists and through a tensor.
    for form in (encoding["input_ids"], [encoding["input_ids"]], torch.tensor([encoding["input_ids"]])):
        again = inject_into_chunks(form, [slot(clip, "s", dog, "z"), slot(clip, "s", cat, "y")],
                                   SpecialTokens.from_tokenizer(clip.tokenizer))
        torch.testing.assert_close(chunk_input_embeds(again, table), chunk_input_embeds(chunks, table))


def test_a_wrong_width_subject_is_refused_when_embedding(clip):
    chunks = inject_into_chunks(clip.tokenize("a photo of z")["l"], [slot(clip, "s", torch.zeros(16, 32))], special(clip))
    with pytest.raises(ConfigError, match="width 32"):
        chunk_input_embeds(chunks, clip.text_model.embeddings.token_embedding.weight)
