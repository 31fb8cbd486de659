"""Bytes moeviz dequantizes inside experts modules and outside them: everything it dequantizes
goes through `nf4_experts._dequantize_blocks`. Shared by tests/test_nf4_runtime.py and
benchmarks/nf4_decode.py."""

from moeviz.model import nf4_experts


class DequantizedBytes:
    """A context manager counting, while it is open, the bytes `_dequantize_blocks` returns while
    an experts module of `model` runs (`experts`) and outside one (`other`)."""

    def __init__(self, model):
        self.experts = self.other = 0
        self._inside = 0
        self._handles = []
        for module in model.modules():
            if nf4_experts._has_4bit_experts(module):
                self._handles.append(module.register_forward_pre_hook(lambda *_: self._enter(1)))
                self._handles.append(module.register_forward_hook(lambda *_: self._enter(-1)))

    def _enter(self, step):
        self._inside += step

    def __enter__(self):
        self._real = real = nf4_experts._dequantize_blocks

        def counting(*args, **kwargs):
            out = real(*args, **kwargs)
            size = out.numel() * out.element_size()
            if self._inside:
                self.experts += size
            else:
                self.other += size
            return out

        nf4_experts._dequantize_blocks = counting
        return self

    def __exit__(self, *exc):
        nf4_experts._dequantize_blocks = self._real
        for handle in self._handles:
            handle.remove()
