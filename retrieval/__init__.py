"""kNN search of query descriptors in a database (FAISS indexes) and the recall@N of its predictions."""
