"""The compiler: state → Postfix maps and Dovecot passwd-files (pure, deterministic)."""

from mailstate.compiler.render import compile_state, diff_rendered, render_domain

__all__ = ["compile_state", "diff_rendered", "render_domain"]
