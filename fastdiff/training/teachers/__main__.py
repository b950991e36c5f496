from fastdiff.training.teachers.vit import main

main()
