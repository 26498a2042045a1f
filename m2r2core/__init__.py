"""M2R2 engine: model access, traced decoding, logit lens. Never imports streamlit or plotly."""
