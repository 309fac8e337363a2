"""
Muon (torch.optim.Muon) for the matrices inside the blocks and AdamW for the rest, stepped as one
optimizer: model.GPT.configure_optimizers(optimizer='muon') builds it.
"""
import torch


class MuonWithAdamW:
    """Muon and AdamW stepped as one optimizer, so that train.py's learning-rate schedule, gradient
    clipping, GradScaler and checkpoints handle it as they handle AdamW alone: one param_groups
    list (Muon's group first; the dicts are the optimizers' own), one state_dict."""

    def __init__(self, matrices, adamw, lr, weight_decay, momentum, device_type):
        # match_rms_adamw (Moonshot's "Muon is Scalable"): the update's RMS matches a typical AdamW
        # step's, so lr and weight_decay live on AdamW's scale rather than Keller Jordan's original
        # (lr ~0.02, whose step size also depends on the matrix's aspect ratio)
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     adjust_lr_fn='match_rms_adamw')
        self.adamw = adamw
        self.float32 = device_type == 'cpu' and not getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()

    @property
    def param_groups(self):  # looked up each time: load_state_dict replaces an optimizer's groups
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self):
        """torch.optim.Muon's step on its own state, with the matrices of one shape orthogonalised
        together: one batched Newton-Schulz iteration per shape instead of one per matrix (for
        config/cpu.py 4 instead of 24: 42 ms a step against torch's 47, docs/recipe.md)."""
        for group in self.muon.param_groups:
            by_shape = {}
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.muon.state[p]
                if 'momentum_buffer' not in state:
                    state['momentum_buffer'] = torch.zeros_like(p.grad)
                buf = state['momentum_buffer'].lerp_(p.grad, 1 - group['momentum'])
                by_shape.setdefault(p.shape, []).append((p, p.grad.lerp(buf, group['momentum']) if group['nesterov'] else buf))
            for shape, pairs in by_shape.items():
                updates = orthogonalise(torch.stack([u for _, u in pairs]), group['ns_coefficients'],
                                        group['ns_steps'], group['eps'], torch.float32 if self.float32 else torch.bfloat16)
                lr = group['lr'] * 0.2 * max(shape) ** 0.5  # adjust_lr_fn='match_rms_adamw', as built above
                for (p, _), update in zip(pairs, updates):
                    p.mul_(1 - group['lr'] * group['weight_decay']).add_(update, alpha=-lr)
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {'muon': self.muon.state_dict(), 'adamw': self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state['muon'])
        self.adamw.load_state_dict(state['adamw'])


def orthogonalise(grads, ns_coefficients, ns_steps, eps, dtype):
    """torch.optim.Muon's orthogonalisation, its quintic Newton-Schulz iteration, on a stack of
    matrices of one shape (n, rows, cols). dtype: torch's bf16, or float32 on a CPU without bf16
    instructions, where bf16 products are emulated and torch's took most of config/cpu.py's step
    (docs/performance.md)."""
    a, b, c = ns_coefficients
    tall = grads.size(1) > grads.size(2)
    x = grads.to(dtype).mT if tall else grads.to(dtype)
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)  # each a spectral norm of at most 1
    for _ in range(ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x
