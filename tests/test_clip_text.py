"""Our CLIP text transformer must equal transformers' CLIPTextModel on the same weights."""

import pytest
import torch
from transformers import CLIPTextModel

from adaface_core.clip_text import ClipAttention, ClipTextConfig, ClipTextTransformer
from adaface_core.weights import load_clip_text_folder
from adaface_core.tiny_models import TinySpec, random_clip_text, write_clip_text_folder


@pytest.mark.parametrize("weights_name", ["model.safetensors", "pytorch_model.bin"])
def test_matches_transformers_clip_text_model(tmp_path, weights_name):
    """Both files a CLIPTextModel folder ships with (Arc2Face's ``encoder/`` has ``pytorch_model.bin``)."""
    model = random_clip_text(TinySpec())
    folder = write_clip_text_folder(model, tmp_path / "encoder", weights_name)
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", weights_name])
    reference = CLIPTextModel.from_pretrained(str(folder), local_files_only=True).eval()
    ours = load_clip_text_folder(folder).eval()
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)
        got = ours(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_token_embeds_path_equals_ids_path():
    model = random_clip_text(TinySpec()).eval()
    ids = torch.randint(0, 49406, (2, 77))
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = model(token_embeds=model.token_embeds(ids)).last_hidden_state
    torch.testing.assert_close(a, b)


def test_expansion_without_noise_keeps_output_exactly():
    torch.manual_seed(0)
    attention = ClipAttention(ClipTextConfig(hidden_size=32, num_attention_heads=4), multiplier=1)
    x = torch.randn(2, 9, 32)
    before = attention(x)
    attention.expand(4, perturb_std=0.0)
    assert attention.multiplier == 4 and attention.k_proj.out_features == 128
    torch.testing.assert_close(attention(x), before, atol=1e-6, rtol=1e-5)
    attention.expand(2, perturb_std=0.0)  # multipliers compose: 4 * 2
    assert attention.multiplier == 8
    torch.testing.assert_close(attention(x), before, atol=1e-6, rtol=1e-5)


def test_expansion_with_noise_changes_only_the_copies():
    torch.manual_seed(0)
    attention = ClipAttention(ClipTextConfig(hidden_size=32, num_attention_heads=4))
    original = attention.k_proj.weight.detach().clone()
    attention.expand(2, perturb_std=0.1, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(attention.k_proj.weight[:32], original)
    relative = (attention.k_proj.weight[32:].detach() - original).std() / original.std()
    assert 0.05 < float(relative) < 0.2


def test_causal_mask_keeps_expanded_copies_in_order():
    """A token never attends to later tokens, even through their extra key copies."""
    torch.manual_seed(0)
    model = ClipTextTransformer(ClipTextConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, vocab_size=100), [3, 2])
    ids = torch.randint(0, 100, (1, 12))
    changed = ids.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 100
    with torch.no_grad():
        a = model(input_ids=ids).last_hidden_state
        b = model(input_ids=changed).last_hidden_state
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])
