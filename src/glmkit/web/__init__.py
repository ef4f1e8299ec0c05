"""The browser chat page (Gradio); ``glmkit web`` runs it alone, ``glmkit serve --web`` mounts it at /web."""

import os

# Set before gradio is first imported: no usage telemetry or version checks to outside hosts.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
