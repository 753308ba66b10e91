"""stable-audio-bento: serve stabilityai/stable-audio-open-1.0 with BentoML."""
