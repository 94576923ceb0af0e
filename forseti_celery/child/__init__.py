"""What runs inside a keyed process: its main loop, its mailbox and the pipe protocol to its worker.
Never imports the worker or the client side.
"""
