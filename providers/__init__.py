"""Upstream providers, one module per config kind: openai.py, gemini.py, lyria.py (pooled HTTP in http.py).

Which kind may serve which model mode is config.MODE_KINDS, checked at start-up; each route then calls its
provider module directly, since their calls differ (an OpenAI relay, Gemini's REST shapes, a Lyria websocket).
"""
