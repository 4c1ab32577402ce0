"""Model architectures, by ModelArgs.model_type."""

from .v3 import Model as KSSMv3

ARCHITECTURES = {"kssm_v3": KSSMv3}


def build_model(args):
    try:
        return ARCHITECTURES[args.model_type](args)
    except KeyError:
        raise ValueError(
            f"unknown model_type {args.model_type!r}; known: {', '.join(ARCHITECTURES)}"
        ) from None
