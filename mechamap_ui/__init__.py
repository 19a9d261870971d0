"""The only Streamlit-aware helpers: caching, session state keys, shared widgets (pages -> here -> core)."""
