"""The foundation every layer may import: errors, image files, lesions, inverse weights, the progress protocol.

Nothing here imports torch (``weights`` accepts torch tensors but only imports torch when given one).
"""
