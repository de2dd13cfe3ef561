"""Privacy of the clients' data: what a curious server or peer can recover of it
(:mod:`flglm.privacy.attacks`, measured on real traffic by :mod:`flglm.privacy.evaluation`)
and the defenses against it (:mod:`flglm.privacy.defenses`)."""

from flglm.privacy.defenses import (
    ClientDefenses,
    PrivacyGuard,
    apply_secret_init,
    client_defenses,
    private_parameter_names,
    secret_generator,
)

__all__ = ["ClientDefenses", "PrivacyGuard", "apply_secret_init", "client_defenses", "private_parameter_names", "secret_generator"]
