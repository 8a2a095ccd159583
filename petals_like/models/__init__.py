"""Model math and metadata: ModelSpec (spec), block spans (span), attention and the KV cache (attention).

Kept free of imports so that `import petals_like.models.spec` stays cheap for clients.
"""
