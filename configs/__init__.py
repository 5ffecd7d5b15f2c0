"""The shipped run configs (installed as `icm_jax.configs`; `icm-jax
--config=NAME` finds them by name)."""
