"""The ops methods compute through. For now plain-torch reference implementations (with
hand-written backward passes that skip frozen operands); Triton kernels will sit behind the
same functions.
"""
