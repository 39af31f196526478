"""The attnopt::* operators: torch.library.opcheck, and the exact operator's semantics."""

import json

import pytest
import torch

from attnopt.codegen.ops import FAMILY_OPS, op_for
from attnopt.replacements.exact import attention_reference


def _config(**extra) -> str:
    return json.dumps({"site": "test#0", "family": "exact", "config": {}, "mask_static": False, **extra})


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_exact_operator_passes_opcheck(causal, with_mask):
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = (torch.rand(2, 1, 9, 9) > 0.3) | torch.eye(9, dtype=torch.bool) if with_mask else None
    torch.library.opcheck(op_for("exact"), (q, k, v, mask, [], 0.25, causal, _config()))


def test_every_family_has_an_operator_with_a_fake_kernel():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)
    for family in FAMILY_OPS:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode() as mode:
            fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
            out = op_for(family)(fq, fk, fv, None, [], 0.5, True, _config())
        assert tuple(out.shape) == (1, 2, 5, 4)


@pytest.mark.parametrize("nq,nk", [(7, 7), (3, 7), (1, 7)])
def test_exact_operator_is_bottom_right_causal_and_gqa(nq, nk):
    q, k, v = torch.randn(1, 6, nq, 16), torch.randn(1, 2, nk, 16), torch.randn(1, 2, nk, 16)
    out = op_for("exact")(q, k, v, None, [], 0.3, True, _config())
    torch.testing.assert_close(out, attention_reference(q, k, v, scale=0.3, causal=True))


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("causal", [False, True])
def test_exact_operator_drops_a_mask_that_masks_nothing(monkeypatch, kind, causal):
    """Hugging Face encoders pass an all-true mask for unpadded batches; SDPA must not read it.
    A mask with one masked key is kept."""
    import torch.nn.functional as F

    q, k, v = (torch.randn(2, 4, 12, 16) for _ in range(3))
    allowed = torch.ones(2, 1, 12, 12, dtype=torch.bool)
    padded = allowed.clone()
    padded[1, :, :, -1] = False
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attn_mask"))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    for mask, dropped in ((allowed, True), (padded, False)):
        given = mask if kind == "bool" else torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
        out = op_for("exact")(q, k, v, given, [], 0.25, causal, _config())
        torch.testing.assert_close(out, attention_reference(q, k, v, mask, scale=0.25, causal=causal))
        assert (seen[-1] is None) == dropped  # causal and dropped: SDPA's own is_causal, no mask


def test_one_hook_observes_redirects_and_restores():
    """Calibration's observer and the planner's overrides are the same hook: the innermost wins,
    each restores the one before it, and without one the operator runs its own kernel."""
    from attnopt.codegen import ops

    q = torch.randn(1, 2, 8, 4)
    exact = op_for("exact")(q, q, q, None, [], 0.5, True, _config())
    seen = []
    assert ops.set_observer(lambda site, call: seen.append((site, call.causal))) is None
    keep = torch.tensor([0])
    with ops.overrides({"test#0": ("head_pruned", {}, [keep])}):
        pruned = op_for("exact")(q, q, q, None, [], 0.5, True, _config())
    assert seen == []  # the overrides replaced the observer inside the block
    op_for("exact")(q, q, q, None, [], 0.5, True, _config())
    assert seen == [("test#0", True)]  # and restored it after
    assert callable(ops.set_observer(None))
    torch.testing.assert_close(pruned[:, 0], exact[:, 0])
    assert pruned[:, 1].abs().max() == 0  # the emulation kernel zeroed the pruned head
    torch.testing.assert_close(op_for("exact")(q, q, q, None, [], 0.5, True, _config()), exact)
