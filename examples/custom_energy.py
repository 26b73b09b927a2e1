"""A new energy in one file: a two-layer block whose hidden layer also has symmetric
lateral connections. Only `state_shapes` and `phi` are written; the relaxation steps come
from autograd on `phi`, and every estimator works on the block as it is."""
import torch
from torch import Tensor, nn

import eqprop
from eqprop.testing import check_estimator


class LateralHopfield(eqprop.EnergyBlock):
    """Phi = <s_1, u> + <s_2, W s_1 + b> + 1/2 <s_2, K s_2>, with K symmetric and zero-diagonal."""

    def __init__(self, n_in: int, n_hidden: int, **settings):
        super().__init__([eqprop.Logistic(), eqprop.Logistic()], **settings)
        self.forward_map = nn.Linear(n_in, n_hidden)
        self.lateral = nn.Parameter(0.1 * torch.randn(n_hidden, n_hidden))

    def state_shapes(self, in_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        return [in_shape, (self.forward_map.out_features,)]

    def phi(self, s: list[Tensor], u: Tensor) -> Tensor:
        k = self.lateral + self.lateral.t()
        k = k - torch.diag(torch.diag(k))
        s1, s2 = s
        return (s1 * u).sum(1) + (s2 * self.forward_map(s1)).sum(1) + 0.5 * ((s2 @ k) * s2).sum(1)


if __name__ == "__main__":
    torch.manual_seed(0)
    block = LateralHopfield(4, 6, T1=400, tol=1e-12)
    model = eqprop.FFEBM(nn.Linear(8, 4), block, nn.Linear(6, 3))  # EP by default
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    print(f"loss {loss.item():.4f}, free phase {model.relax_stats()[0]['free']}")
    report = check_estimator(block, eqprop.EP(beta=1e-4, T2=400, tol=1e-12), torch.randn(3, 4))
    print(f"EP against finite differences: cosine {report.cosine:.8f}, relative error {report.rel_error:.1e}")
