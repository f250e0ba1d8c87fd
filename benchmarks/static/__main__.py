from benchmarks.static.cli import main

raise SystemExit(main())
