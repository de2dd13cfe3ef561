"""Privacy of the clients' data against a curious server: defenses (:mod:`flglm.privacy.defenses`)."""

from flglm.privacy.defenses import (
    ClientDefenses,
    PrivacyGuard,
    apply_secret_init,
    client_defenses,
    private_parameter_names,
    secret_generator,
)

__all__ = ["ClientDefenses", "PrivacyGuard", "apply_secret_init", "client_defenses", "private_parameter_names", "secret_generator"]
