"""`tuneforge serve`: an OpenAI-compatible server for tuneforge models.

create_app (app.py) builds the FastAPI app in-process; run_server (server.py)
binds it with uvicorn and drains on SIGTERM; vllm.py hands generation to vLLM.
"""
