"""What can be fetched (the Phi-3 repositories on the hub, the variants inside them) and how it
is packaged (the MLflow flavors).
"""

from __future__ import annotations

from enum import StrEnum

from phi3ops.errors import InvalidInputError

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


class Flavor(StrEnum):
    """How a model is packaged for MLflow."""

    ONNX = "onnx"
    TRANSFORMERS = "transformers"

    @property
    def default_variant(self) -> Variant:
        """The hub variant this flavor packages unless told otherwise."""
        return Variant.PYTORCH if self is Flavor.TRANSFORMERS else Variant.ONNX_CPU_INT4


def source_variant(flavor: Flavor | str, variant: Variant | str | None) -> tuple[Variant, bool]:
    """What to fetch for a flavor: the variant, and whether to build ONNX int4 from it.

    Raises:
        InvalidInputError: The transformers flavor was asked to package the ONNX variant.
    """
    flavor = Flavor(flavor)
    variant = Variant(variant) if variant is not None else flavor.default_variant
    if flavor is Flavor.TRANSFORMERS and variant is not Variant.PYTORCH:
        raise InvalidInputError(
            f"The transformers flavor needs variant 'pytorch', not {variant.value!r}: it "
            f"packages PyTorch weights. Use flavor 'onnx' for the ONNX int4 variant."
        )
    return variant, flavor is Flavor.ONNX and variant is Variant.PYTORCH
