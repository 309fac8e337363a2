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

    def step(self):
        if self.float32:  # torch.optim.Muon calls its module's function: the one place to swap it
            module = torch.optim._muon
            bf16, module._zeropower_via_newtonschulz = module._zeropower_via_newtonschulz, orthogonalise_float32
            try:
                self.muon.step()
            finally:
                module._zeropower_via_newtonschulz = bf16
        else:
            self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {'muon': self.muon.state_dict(), 'adamw': self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state['muon'])
        self.adamw.load_state_dict(state['adamw'])


def orthogonalise_float32(grad, ns_coefficients, ns_steps, eps):
    """torch.optim.Muon's orthogonalisation, its quintic Newton-Schulz iteration, in float32 instead
    of bf16: on a CPU without bf16 instructions bf16 products are emulated, and torch's took most of
    config/cpu.py's step there (docs/performance.md)."""
    a, b, c = ns_coefficients
    tall = grad.size(0) > grad.size(1)
    x = grad.float().T if tall else grad.float()
    x = x / x.norm().clamp(min=eps)  # a spectral norm of at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x
