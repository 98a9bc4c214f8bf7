from kvrelay_worker.router.main import main

main()
