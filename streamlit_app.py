"""M2R2 Studio: entry point. Shared sidebar, then one page per view."""

import streamlit as st

from app.components.controls import sidebar_settings

st.set_page_config(page_title="M2R2 Studio", page_icon="🧭", layout="wide")
sidebar_settings()
st.sidebar.caption("M2R2: Mixture of Multi-Rate Residuals (arXiv 2502.02040). Batch size 1, "
                   "CPU-first.")
page = st.navigation([
    st.Page("app/pages/residuals.py", title="Residual Dynamics", icon="🌊", default=True),
    st.Page("app/pages/exits.py", title="Exit Threshold debugger", icon="🚪",
            url_path="exits"),
    st.Page("app/pages/speculative.py", title="Speculative Decoding", icon="🎯",
            url_path="speculative"),
    st.Page("app/pages/experts.py", title="Expert Loading", icon="📦", url_path="experts"),
    st.Page("app/pages/training.py", title="Training", icon="🏋️", url_path="training"),
])
page.run()
