"""gradcheck and gradgradcheck in float64 for all four ops, train and eval."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normkit.functional as nF

pytestmark = pytest.mark.usefixtures("backend")


def _t(*shape, positive=False):
    t = torch.randn(*shape, dtype=torch.float64)
    return (t.abs() + 0.5 if positive else t).requires_grad_(not positive)


CASES = {
    "bn_train_2d": lambda: (lambda x, w, b: nF.batch_norm(x, None, None, w, b, True),
                            (_t(5, 3), _t(3), _t(3))),
    "bn_train_4d": lambda: (lambda x, w, b: nF.batch_norm(x, None, None, w, b, True),
                            (_t(3, 2, 3, 2), _t(2), _t(2))),
    "bn_train_cl": lambda: (
        lambda x, w, b: nF.batch_norm(x, None, None, w, b, True),
        (_t(3, 2, 3, 2).contiguous(memory_format=torch.channels_last).detach().requires_grad_(),
         _t(2), _t(2))),
    "bn_train_running": lambda: (
        lambda x, w, b: nF.batch_norm(x, torch.zeros(2, dtype=torch.float64),
                                      torch.ones(2, dtype=torch.float64), w, b, True),
        (_t(4, 2, 3), _t(2), _t(2))),
    "bn_eval": lambda: (
        lambda x, w, b, rm=_t(3).detach(), rv=_t(3, positive=True): nF.batch_norm(
            x, rm, rv, w, b, False),
        (_t(4, 3, 2), _t(3), _t(3))),
    "bn_no_affine": lambda: (lambda x: nF.batch_norm(x, None, None, training=True), (_t(4, 3, 2),)),
    "bn_empty": lambda: (lambda x, w, b: nF.batch_norm(x, None, None, w, b, True),
                         (_t(0, 3, 2), _t(3), _t(3))),
    "in_train": lambda: (lambda x, w, b: nF.instance_norm(x, weight=w, bias=b),
                         (_t(2, 3, 4), _t(3), _t(3))),
    "in_eval": lambda: (
        lambda x, w, b, rm=_t(3).detach(), rv=_t(3, positive=True): nF.instance_norm(
            x, rm, rv, w, b, use_input_stats=False),
        (_t(2, 3, 4), _t(3), _t(3))),
    "gn": lambda: (lambda x, w, b: nF.group_norm(x, 2, w, b), (_t(2, 4, 3), _t(4), _t(4))),
    "gn_cl": lambda: (
        lambda x, w, b: nF.group_norm(x, 3, w, b),
        (_t(2, 6, 2, 3).contiguous(memory_format=torch.channels_last).detach().requires_grad_(),
         _t(6), _t(6))),
    "ln": lambda: (lambda x, w, b: nF.layer_norm(x, (3, 4), w, b), (_t(2, 3, 4), _t(3, 4), _t(3, 4))),
    "ln_no_affine": lambda: (lambda x: nF.layer_norm(x, (5,)), (_t(3, 5),)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gradcheck_and_gradgradcheck(case):
    fn, inputs = CASES[case]()
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_double_backward_matches_torch():
    """Second derivatives (a gradient-penalty style loss) equal torch's."""
    import torch.nn.functional as tF
    x = _t(4, 3, 5)
    w, b = _t(3), _t(3)
    results = []
    for F in (tF, nF):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = F.batch_norm(xs, None, None, ws, bs, True)
        (gx,) = torch.autograd.grad((y * y.sin()).sum(), xs, create_graph=True)
        gx.square().sum().backward()
        results.append((xs.grad, ws.grad, bs.grad))
    for a, b_ in zip(*results):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)
