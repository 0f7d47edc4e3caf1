"""msrun worker (2 ranks): ring attention (CP = 2) trains while a stranger attacks the host transport's ports.

Usage (under msrun, 2 workers): python attack_worker.py OUT_DIR

Each rank trains the tiny LLaMA2 ring case of ``train_worker.case_tree`` twice from the same seed: first while a
thread of rank 0 connects to every listening port of the transport over and over (the hellos of the issue -
"I am rank 1" then close, a forged K/V block, a 2**62-byte header, a hello with a made-up proof - and silent
connections that hold pending hellos), then without it.  Each rank writes OUT_DIR/rank<r>.json: the losses of
both runs, the connections its transport refused and (rank 0) the attacks made.
"""
import json
import os
import socket
import struct
import threading
import time

from worker_main import join_launch

WORLD, STEPS = 2, 8
OLD_HELLO = struct.Struct("<q")
HEADER = struct.Struct("<QQ")


def _attack_once(address) -> None:
    payloads = [OLD_HELLO.pack(1), OLD_HELLO.pack(0),
                OLD_HELLO.pack(1) + HEADER.pack(0, 48) + struct.pack("<12f", *[666.0] * 12),
                OLD_HELLO.pack(1) + HEADER.pack(0, 2 ** 62),
                struct.pack("<4sHqq16sH", b"MFLS", 1, 1, 0, bytes(16), 4) + b"cp_0" + bytes(32)]
    for payload in payloads:
        try:
            with socket.create_connection(address, timeout=2) as sock:
                sock.sendall(payload)
        except OSError:
            pass


def _attack(stop: threading.Event, made: list) -> None:
    from mf_longseq.parallel import host_p2p
    while not stop.is_set():
        transports = host_p2p._TRANSPORT
        tables = list(transports[0]._addresses.values()) if transports else []
        addresses = {addr for table in tables for addr in table.values()}
        silent = []
        for address in addresses:
            _attack_once(address)
            for _ in range(4):
                try:
                    silent.append(socket.create_connection(address, timeout=2))
                except OSError:
                    pass
            made.append(address)
        stop.wait(0.3)
        for sock in silent:
            sock.close()


def _train(out_dir: str, name: str):
    from train_worker import case_tree
    from mf_longseq.train.job import JobOptions, run_job
    records = run_job(JobOptions(config=case_tree("llama2", cp=2, dp=1), steps=STEPS,
                                 output_dir=os.path.join(out_dir, name)))
    return [r.loss for r in records]


def main():
    rank, out_dir, _ = join_launch(WORLD)
    stop, made = threading.Event(), []
    attacker = threading.Thread(target=_attack, args=(stop, made), daemon=True) if rank == 0 else None
    if attacker:
        attacker.start()
    attacked = _train(out_dir, "attacked")
    stop.set()
    if attacker:
        attacker.join()
    time.sleep(0.5)
    clean = _train(out_dir, "clean")
    from mf_longseq.parallel import host_p2p
    refusals = getattr(host_p2p._TRANSPORT[0], "refusals", None)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"attacked": attacked, "clean": clean, "attacks": len(made),
                   "refused": refusals.count if refusals else 0,
                   "reasons": sorted({r for _, r in refusals.recent}) if refusals else []}, handle)
    print(f"attack_worker: rank {rank} done: {len(made)} attack rounds, losses {attacked}", flush=True)


if __name__ == "__main__":
    main()
