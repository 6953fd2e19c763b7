"""Command implementations (``xpopt coordcheck``, ``xpopt transfer``); each imports its framework lazily."""
