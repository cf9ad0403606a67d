import numpy as np
import pytest
import torch

from qid2_diffusers import DirectionEncoder, build_unet, unet_config
from qid2_diffusers.models.direction_encoder import direction_features


@pytest.mark.parametrize("R", [3, 6])
@pytest.mark.parametrize("size", [(145, 174), (13, 18), (6, 8)])
def test_unet_forward_shapes(R, size):
    from qid2_diffusers.image_processor import QID2ImageProcessor

    torch.manual_seed(0)
    unet = build_unet("tiny", R)
    enc = DirectionEncoder(num_references=R, embed_dim=unet.config.cross_attention_dim)
    x = torch.randn(2, 1 + R, *size)
    xp, orig = QID2ImageProcessor(4).pad(x)
    assert orig == size and xp.shape[-2] % 4 == 0 and xp.shape[-1] % 4 == 0 and min(xp.shape[-2:]) >= 16
    tokens = enc(torch.randn(2, 3), torch.randn(2, R, 3))
    assert tokens.shape == (2, R + 1, unet.config.cross_attention_dim)
    out = unet(xp, torch.tensor([10, 500]), encoder_hidden_states=tokens).sample
    assert out.shape == (2, 1, *xp.shape[-2:])
    assert torch.isfinite(out).all()


def test_presets_config():
    for preset, channels in [("paper", (128, 128, 256)), ("small", (32, 32, 64))]:
        for R in (3, 6):
            cfg = unet_config(preset, R)
            assert cfg["in_channels"] == 1 + R and cfg["out_channels"] == 1
            assert tuple(cfg["block_out_channels"]) == channels and cfg["layers_per_block"] == 1
            assert cfg["only_cross_attention"] is True
    with pytest.raises(ValueError, match="unknown preset"):
        unet_config("huge", 3)


def test_no_self_attention_over_pixels_at_full_resolution():
    unet = build_unet("tiny", 3)
    for block in list(unet.down_blocks) + list(unet.up_blocks):
        for transformer in block.attentions:
            for tb in transformer.transformer_blocks:
                # attn1 of an only_cross_attention block attends to the direction tokens.
                assert tb.only_cross_attention and tb.attn1.is_cross_attention


def test_direction_features_sign_invariant_and_target_distinct():
    rng = np.random.default_rng(0)
    t = torch.tensor(rng.normal(size=(4, 3)), dtype=torch.float32)
    r = torch.tensor(rng.normal(size=(4, 3, 3)), dtype=torch.float32)
    f = direction_features(t, r)
    assert f.shape == (4, 4, 7)
    torch.testing.assert_close(f, direction_features(-t, r * torch.tensor([1.0, -1.0, 1.0])[None, :, None]))
    enc = DirectionEncoder(num_references=3, embed_dim=16)
    torch.testing.assert_close(enc(t, r), enc(-t, -r))
    # Same direction as target and as a reference: different tokens (rank embedding).
    same = enc(t[:1], t[:1, None, :].repeat(1, 3, 1))
    assert not torch.allclose(same[0, 0], same[0, 1])


def test_encoder_rejects_wrong_r():
    enc = DirectionEncoder(num_references=3, embed_dim=16)
    with pytest.raises(ValueError, match="R = 3"):
        enc(torch.randn(1, 3), torch.randn(1, 6, 3))


def test_encoder_round_trip(tmp_path):
    enc = DirectionEncoder(num_references=6, embed_dim=16, hidden_dim=32)
    enc.save_pretrained(tmp_path)
    again = DirectionEncoder.from_pretrained(tmp_path)
    assert again.config.num_references == 6
    t, r = torch.randn(2, 3), torch.randn(2, 6, 3)
    torch.testing.assert_close(enc(t, r), again(t, r), rtol=0, atol=0)


def test_coarse_attention_keeps_the_condition_at_every_level(tmp_path):
    """``attention="coarse"``: no transformer blocks at full resolution, the direction tokens projected into the
    time embedding, so every block still sees them; saved and reloaded by diffusers' own config."""
    from diffusers import UNet2DConditionModel

    from qid2_diffusers.models.unet import attention_of, unet_forward

    torch.manual_seed(0)
    unet = build_unet("tiny", 3, physics_prior=True, attention="coarse").eval()
    assert not hasattr(unet.down_blocks[0], "attentions") and not hasattr(unet.up_blocks[-1], "attentions")
    assert all(len(b.attentions) for b in list(unet.down_blocks[1:]) + list(unet.up_blocks[:-1]))
    assert attention_of(unet) == "coarse" and attention_of(build_unet("tiny", 3)) == "every"
    tokens = DirectionEncoder(num_references=3, embed_dim=unet.config.cross_attention_dim)(torch.randn(1, 3),
                                                                                          torch.randn(1, 3, 3))
    x, t = torch.randn(1, 6, 16, 16), torch.tensor([999])
    with torch.no_grad():
        out = unet_forward(unet, x, t, tokens)
        # The tokens through the time embedding alone (cross-attention context unchanged) change the output.
        moved = unet(x, t, encoder_hidden_states=tokens, class_labels=(tokens + 1).flatten(1)).sample
    assert out.shape == (1, 1, 16, 16) and (moved - out).abs().max() > 1e-4
    unet.save_pretrained(tmp_path)
    again = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(unet_forward(again, x, t, tokens), out)
    with pytest.raises(ValueError, match="unknown attention"):
        unet_config("tiny", 3, attention="none")
