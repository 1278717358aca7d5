"""The interactive terminal demo (``halluguard demo``): plain and guarded decoding side by side.

``core`` holds what the demo does (pictures, methods, settings, answers), ``render`` how it looks
(rich), ``app`` the session and its one-shot mode, ``meter`` the attention picture.
"""
