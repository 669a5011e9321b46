from vidrep.viz.render import main

main()
