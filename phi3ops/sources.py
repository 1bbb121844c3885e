"""What can be fetched: the Phi-3 repositories on the hub and the variants inside them."""

from __future__ import annotations

from enum import StrEnum

PYTORCH_REPO_ID = "microsoft/Phi-3-mini-4k-instruct"
ONNX_REPO_ID = "microsoft/Phi-3-mini-4k-instruct-onnx"
ONNX_CPU_INT4_SUBFOLDER = "cpu_and_mobile/cpu-int4-rtn-block-32-acc-level-4"


class Variant(StrEnum):
    """A model layout inside a hub repository, and which files of it a fetch needs."""

    PYTORCH = "pytorch"
    ONNX_CPU_INT4 = "onnx-cpu-int4"

    @property
    def default_repo_id(self) -> str:
        """The Microsoft repository that publishes this variant."""
        return PYTORCH_REPO_ID if self is Variant.PYTORCH else ONNX_REPO_ID

    @property
    def subfolder(self) -> str:
        """Folder inside the repository that holds the loadable model ('' for the root)."""
        return "" if self is Variant.PYTORCH else ONNX_CPU_INT4_SUBFOLDER

    @property
    def allow_patterns(self) -> tuple[str, ...]:
        """Glob patterns (fnmatch, on repo paths) of the files this variant needs."""
        if self is Variant.PYTORCH:
            # Weights, configs and tokenizer; not the repo's sample code, images or ONNX folders.
            return ("*.json", "*.safetensors", "tokenizer.model", "LICENSE", "README.md")
        return (f"{ONNX_CPU_INT4_SUBFOLDER}/*", "LICENSE", "README.md")
